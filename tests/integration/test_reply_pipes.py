"""Replies whose data is in memory (manifests, configs): written into their pipe before the reply when they fit
in a new pipe, by a producer when they do not; and in-order requests answered at once by the session when
nothing is ahead of them, without ever overtaking one that is (issue 17's round trips)."""

from __future__ import annotations

import array
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.client import ImageProxy
from proxy.common.pipes import PIPE_DEFAULT_SIZE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(root: Path, annotation_size: int) -> tuple[str, bytes]:
    """An OCI layout with one layer-less image whose manifest carries an annotation of ``annotation_size``
    bytes: its reference and the manifest's bytes."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, "config": {}}
    ).encode()
    (blobs / digest(config)[7:]).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [],
            "annotations": {"filler": "x" * annotation_size},
        }
    ).encode()
    (blobs / digest(manifest)[7:]).write_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return f"oci:{root}:latest", manifest


@pytest.mark.parametrize("annotation_size", [100, PIPE_DEFAULT_SIZE - 1000, PIPE_DEFAULT_SIZE + 10, 300_000])
async def test_a_manifest_of_any_size_arrives_whole(tmp_path: Path, annotation_size: int) -> None:
    ref, manifest = write_layout(tmp_path / "layout", annotation_size)
    async with ImageProxy.spawn(extra_args=["--insecure-policy"]) as proxy:
        image = await proxy.open_image(ref)
        for _ in range(3):
            got_digest, got = await proxy.get_manifest(image)
            assert got == manifest and got_digest == digest(manifest)


class RawServer:
    """Our server spawned on a socketpair, spoken to packet by packet (requests may be sent before replies are
    read); the fds that came with replies are closed at the end."""

    def __init__(self, *flags: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "proxy", "experimental-image-proxy", "--insecure-policy", *flags]
        self.process = subprocess.Popen(argv, stdin=theirs)
        theirs.close()
        self.sock.settimeout(60)
        self.fds: list[int] = []

    def send(self, method: str, *args: object, request_id: int | None = None) -> None:
        request: dict[str, object] = {"method": method, "args": list(args)}
        if request_id is not None:
            request["id"] = request_id
        self.sock.send(json.dumps(request).encode())

    def receive(self) -> dict:
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        return json.loads(data)

    def open(self, ref: str) -> int:
        self.send("Initialize")
        assert self.receive()["success"]
        self.send("OpenImage", ref)
        opened = self.receive()
        assert opened["success"], opened
        return opened["value"]

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.process.wait(timeout=60)


def test_pipelined_in_order_requests_are_answered_in_order(tmp_path: Path) -> None:
    # sent together, before any reply is read: GetManifest twice (answerable at once), GetConfig (read from the
    # layout in a worker thread: the dispatcher's), GetManifest again (must wait behind GetConfig)
    ref, manifest = write_layout(tmp_path / "layout", 100)
    server = RawServer()
    try:
        image = server.open(ref)
        for method in ("GetManifest", "GetManifest", "GetConfig", "GetManifest"):
            server.send(method, image)
        replies = [server.receive() for _ in range(4)]
        assert all(r["success"] for r in replies), replies
        assert [r["value"] for r in replies] == [digest(manifest), digest(manifest), None, digest(manifest)]
        assert len({r["pipeid"] for r in replies}) == 4
        for reply in replies:
            server.send("FinishPipe", reply["pipeid"])
        assert [server.receive()["success"] for _ in replies] == [True] * 4
    finally:
        server.close()


def test_a_request_is_never_answered_before_an_earlier_one_still_running(tmp_path: Path) -> None:
    # OpenImage of a registry that accepted the connection and says nothing is in progress (the dispatcher is
    # busy with it) when GetManifest of an open image arrives: GetManifest could be answered at once, and must
    # still wait for OpenImage's reply
    ref, manifest = write_layout(tmp_path / "layout", 100)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port = listener.getsockname()[1]
    server = RawServer("--tls-verify=false")
    try:
        image = server.open(ref)
        server.send("OpenImage", f"docker://127.0.0.1:{port}/silent/image:latest")
        connection, _ = listener.accept()  # the proxy is inside that OpenImage now
        server.send("GetManifest", image)
        connection.close()
        listener.close()
        first, second = server.receive(), server.receive()
        assert not first["success"] and "127.0.0.1" in first["error"], first
        assert second["success"] and second["value"] == digest(manifest), second
    finally:
        listener.close()
        server.close()


def test_a_request_with_an_id_that_needs_no_waiting_needs_no_free_slot(tmp_path: Path) -> None:
    # one slot for requests with ids ([limits] concurrent-requests = 1), held by an OpenImage of a registry that
    # accepted the connection and says nothing: GetManifest of an open image, with an id, is answered at once
    # anyway (it neither waits nor takes a slot); the OpenImage is answered once the registry hangs up
    ref, manifest = write_layout(tmp_path / "layout", 100)
    config = tmp_path / "config.toml"
    config.write_text("[limits]\nconcurrent-requests = 1\n")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port = listener.getsockname()[1]
    server = RawServer("--tls-verify=false", "--config", str(config))
    try:
        image = server.open(ref)
        server.send("OpenImage", f"docker://127.0.0.1:{port}/silent/image:latest", request_id=1)
        connection, _ = listener.accept()  # the one slot is taken now
        server.send("GetManifest", image, request_id=2)
        server.sock.settimeout(10)  # far more than an answer at once takes; a wait for the slot never ends
        answered = server.receive()
        assert answered["id"] == 2 and answered["success"] and answered["value"] == digest(manifest), answered
        connection.close()
        listener.close()
        server.sock.settimeout(60)
        opened = server.receive()
        assert opened["id"] == 1 and not opened["success"], opened
    finally:
        listener.close()
        server.close()
