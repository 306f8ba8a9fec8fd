"""Sessions are isolated (issue 13, part 3): an unexpected exception in one session ends that session only.

The daemon runs in the test's own trio loop here (the real ``Daemon`` on a real listening socket), so that an
internal error can be injected into one session: its handler raises for one marked request, as a bug would.
Client A streams a large blob meanwhile; it must get every byte, and a new client C must be served at once.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import traceback
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from proxy.policy import ImagePolicy
from proxy.server.daemon import Daemon, DaemonSettings, bind_listener
from proxy.server.handler import Handler
from proxy.server.limits import DAEMON_LIMITS
from proxy.server.options import ProxyOptions
from tests.support.images import ImageSpec, LayerSpec, build_oci_layout, pseudo_random

BLOB_SIZE = 48 << 20
GUARD = 60.0


@pytest.fixture(scope="module")
def large_layout(tmp_path_factory: pytest.TempPathFactory):
    spec = ImageSpec(layers=(LayerSpec({"large.bin": pseudo_random("isolation", BLOB_SIZE)}),), gzip_level=0)
    layout = build_oci_layout(tmp_path_factory.mktemp("isolation") / "layout", {"large": spec})
    return layout.images["large"]


def _options(tmp_path: Path) -> ProxyOptions:
    registries_d = tmp_path / "registries.d"
    registries_d.mkdir()
    return ProxyOptions(
        policy=ImagePolicy.from_flags(insecure=True, registries_d=str(registries_d)), limits=DAEMON_LIMITS
    )


def _open_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:
            continue
    return found


async def _raw_call(sock: trio.socket.SocketType, method: str, *args: object) -> tuple[dict | None, list[int]]:
    """One request; its reply (None when the daemon closed the connection) and the fds that came with it."""
    await sock.send(json.dumps({"method": method, "args": list(args)}).encode())
    with trio.fail_after(10):
        data, ancdata, _, _ = await sock.recvmsg(32 * 1024, socket.CMSG_SPACE(8))
    fds = array.array("i")
    for _, _, payload in ancdata:
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return (json.loads(data) if data else None), list(fds)


async def test_an_internal_error_ends_only_its_session(
    large_layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_handle = Handler.handle

    async def buggy_handle(self, request):
        if getattr(request, "method", None) == "OpenImage" and "BOOM" in str(request.args):
            raise RuntimeError("an injected bug")  # escapes the handler, as a bug outside its own catch would
        return await real_handle(self, request)

    monkeypatch.setattr(Handler, "handle", buggy_handle)
    caplog.set_level(logging.INFO)
    path = tmp_path / "d.sock"
    settings = DaemonSettings(listen=str(path))
    options = _options(tmp_path)
    daemon = Daemon(bind_listener(settings), options, settings, lambda: (options, settings))
    layer = large_layout.layers[0]
    ref = f"oci:{large_layout.path}:large"
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.serve)  # the socket is bound and listening: connecting waits on the backlog
            a_started = trio.Event()
            a_done = trio.Event()
            a_result: list[bytes] = []

            async def client_a() -> None:
                async with ImageProxy.connect(path) as proxy:
                    image = await proxy.open_image(ref)
                    a_started.set()
                    a_result.append(await proxy.get_blob(image, layer.digest, layer.size))
                a_done.set()

            nursery.start_soon(client_a)
            await a_started.wait()
            fds_before = _open_fds()

            b = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            await b.connect(str(path))
            reply, _ = await _raw_call(b, "Initialize")
            assert reply is not None and reply["success"]
            reply, _ = await _raw_call(b, "OpenImage", ref)
            assert reply is not None and reply["success"]
            reply, fds = await _raw_call(b, "GetManifest", reply["value"])  # a pipe B never reads nor finishes
            assert reply is not None and reply["success"] and len(fds) == 1
            os.close(fds[0])
            reply, _ = await _raw_call(b, "OpenImage", "oci:/BOOM")
            assert reply is None, "the broken session should be closed, not answered"
            b.close()

            # C is served at once while A still streams
            with trio.fail_after(5):
                async with ImageProxy.connect(path) as proxy:
                    image = await proxy.open_image(ref)
                    digest, _ = await proxy.get_manifest(image)
                    assert digest == large_layout.manifest_digest
            await a_done.wait()  # A finishes on its own; GUARD bounds it
            daemon.stop()
    assert a_result[0] == large_layout.blob(layer.digest)
    failures = [r for r in caplog.records if "internal error; closing this connection" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert failures[0].exc_info is not None
    assert "an injected bug" in "".join(traceback.format_exception(failures[0].exc_info[1]))
    assert "uid" in failures[0].getMessage() and "pid" in failures[0].getMessage()
    # B's image and its pipe were closed with its session
    assert _open_fds() <= fds_before
