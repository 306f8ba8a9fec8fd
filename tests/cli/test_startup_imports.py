"""A spawned proxy's start-up imports only what serving needs (issue 17): the signature-verification crypto,
the YAML parser, the daemon's machinery, the registry and HTTP stack (h11, ssl contexts, signature reading),
the archive readers, partial access and the client commands are imported where they are used, not by every
proxy an update agent spawns for a check of a local image. Measured with ``-X importtime`` on the real process,
through Initialize and an OpenImage of a local layout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from tests.support.images import BuiltImage

#: modules (and their submodules) a spawned proxy must not import before it serves an ``oci:`` image
NOT_AT_START = (
    "cryptography",
    "yaml",
    "proxy.server.daemon",
    "proxy.policy.sigstore",
    "proxy.policy.signatures",
    "h11",
    "proxy.http.connection",
    "proxy.registry.client",
    "proxy.registry.source",
    "proxy.sources.archive",
    "tarfile",
    "proxy.partial",
    "proxy.commands.copy",
    "proxy.commands.inspect",
    "proxy.commands.cache",
    "protocol.client",
    "prometheus_client",
    "proxy.server.metrics_http",
    "proxy.server.status",
    "proxy.commands.status",
)


def call(sock: socket.socket, method: str, *args: object) -> dict:
    sock.send(json.dumps({"method": method, "args": list(args)}).encode())
    reply = json.loads(sock.recv(1 << 20))
    assert reply["error"] == "", reply
    return reply


def imported_while_serving(*requests: tuple[str, ...]) -> set[str]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "proxy", "experimental-image-proxy", "--insecure-policy"],
            stdin=theirs,
            stderr=subprocess.PIPE,
            text=True,
        )
        theirs.close()
        ours.settimeout(30)
        for method, *args in requests:
            call(ours, method, *args)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_initialize_and_a_local_open_import_only_what_serving_a_local_image_needs(single: BuiltImage) -> None:
    modules = imported_while_serving(("Initialize",), ("OpenImage", single.ref))
    assert "trio" in modules and "proxy.server.session" in modules, "the importtime output was read"
    unwanted = sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_AT_START))
    assert unwanted == []
