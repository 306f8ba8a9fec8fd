"""Daemon-wide limits (issue 13, part 7): connections in all and per uid, images and pipes per uid over all its
connections, queued request bytes per connection and in all. Each refusal is a log line naming the peer and,
for the client, an error reply (or, for a connection over its queued-bytes budget, a closed socket): never
silence. A real daemon process, configured through ``--config``, serves a local layout."""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.images import ImageSpec, LayerSpec, build_oci_layout, pseudo_random

REPLY_GUARD = 10.0


@pytest.fixture(scope="module")
def layout() -> Iterator:
    root = Path(tempfile.mkdtemp(prefix="image-proxy-limits-"))
    root.chmod(0o755)
    spec = ImageSpec(layers=(LayerSpec({"big.bin": pseudo_random("limits", 8 << 20)}),), gzip_level=0)
    yield build_oci_layout(root / "layout", {"img": spec}).images["img"]
    shutil.rmtree(root)


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


class Client:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: Path) -> Client:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await sock.connect(str(path))
        return cls(sock)

    async def send(self, method: str, *args: object) -> None:
        await self.sock.send(json.dumps({"method": method, "args": list(args)}).encode())

    async def receive(self) -> tuple[dict | None, list[int]]:
        """The next reply (None at EOF) and its fds (closed here: these tests never read pipes)."""
        with trio.fail_after(REPLY_GUARD):
            data, ancdata, _, _ = await self.sock.recvmsg(32 * 1024, socket.CMSG_SPACE(8))
        fds = array.array("i")
        for _, _, payload in ancdata:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return (json.loads(data) if data else None), list(fds)

    async def call(self, method: str, *args: object) -> dict | None:
        await self.send(method, *args)
        reply, fds = await self.receive()
        self.held = getattr(self, "held", []) + fds  # keep pipes' read ends open: the transfers stay in flight
        return reply

    async def open(self, ref: str) -> int:
        assert (await self.call("Initialize"))["success"]
        reply = await self.call("OpenImage", ref)
        assert reply is not None and reply["success"], reply
        return reply["value"]

    def close(self) -> None:
        for fd in getattr(self, "held", []):
            os.close(fd)
        self.held = []
        self.sock.close()


async def test_connections_in_all(start_daemon, tmp_path: Path, layout) -> None:
    daemon = await start_daemon("--config", config(tmp_path, "[daemon]\nmax-connections = 2\n"), "--insecure-policy")
    ref = f"oci:{layout.path}:img"
    first, second = await Client.connect(daemon.socket_path), await Client.connect(daemon.socket_path)
    await first.open(ref)
    await second.open(ref)
    third = await Client.connect(daemon.socket_path)
    refused = await third.call("Initialize")
    assert refused is not None and not refused["success"]
    assert "connection refused: the daemon serves 2 connections, its limit" in refused["error"]
    assert (await third.receive())[0] is None  # and then closed
    third.close()
    line = await daemon.wait_for_log(r"refused connection from pid \d+ uid 0 .*the daemon serves 2 connections")
    assert "pid" in line
    first.close()
    await daemon.wait_for_log(r"connection from pid \d+ closed")
    again = await Client.connect(daemon.socket_path)  # a place is free again
    await again.open(ref)
    again.close()
    second.close()


async def test_connections_per_uid_leave_room_for_other_users(start_daemon, tmp_path: Path, layout) -> None:
    daemon = await start_daemon(
        "--config",
        config(tmp_path, "[daemon]\nmax-connections-per-uid = 1\n"),
        "--insecure-policy",
        "--socket-mode",
        "0666",
    )
    ref = f"oci:{layout.path}:img"
    mine = await Client.connect(daemon.socket_path)
    await mine.open(ref)
    second = await Client.connect(daemon.socket_path)
    refused = await second.call("Initialize")
    assert refused is not None and "uid 0 has 1 connections open, the daemon's limit per user" in refused["error"]
    second.close()
    # another user still gets in
    script = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.settimeout(10); s.connect(sys.argv[1])\n"
        "s.send(json.dumps({'method': 'Initialize', 'args': []}).encode())\n"
        "print(json.loads(s.recv(32768))['success'])\n"
    )
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run a client as another user", pytrace=False)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script]
    done = subprocess.run([*argv, str(daemon.socket_path)], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "True", done.stderr
    mine.close()


async def test_pipes_and_images_per_uid_over_all_its_connections(start_daemon, tmp_path: Path, layout) -> None:
    text = "[daemon]\nopen-pipes-per-uid = 3\nopen-images-per-uid = 3\n"
    daemon = await start_daemon("--config", config(tmp_path, text), "--insecure-policy")
    ref = f"oci:{layout.path}:img"
    layer = layout.layers[0]
    a, b = await Client.connect(daemon.socket_path), await Client.connect(daemon.socket_path)
    image_a = await a.open(ref)
    image_b = await b.open(ref)
    for _ in range(2):  # 8 MiB blobs nobody reads: the transfers stay in flight
        assert (await a.call("GetBlob", image_a, layer.digest, layer.size))["success"]
    assert (await b.call("GetBlob", image_b, layer.digest, layer.size))["success"]
    refused = await b.call("GetBlob", image_b, layer.digest, layer.size)
    assert refused is not None and not refused["success"]
    assert "too many open pipes (3 is the daemon's limit for uid 0 over all its connections)" in refused["error"]
    assert (await b.call("OpenImage", ref))["success"]  # the third image
    refused = await a.call("OpenImage", ref)
    assert refused is not None and "3 images are open, the daemon's limit for uid 0" in refused["error"]
    a.close()  # gives back its two pipes and its image
    await daemon.wait_for_log(r"connection from pid \d+ closed")
    assert (await b.call("GetBlob", image_b, layer.digest, layer.size))["success"]
    b.close()


async def test_a_connection_over_its_queued_bytes_is_closed(start_daemon, tmp_path: Path, layout) -> None:
    daemon = await start_daemon(
        "--config", config(tmp_path, '[limits]\nqueued-request-bytes = "64K"\n'), "--insecure-policy"
    )
    ref = f"oci:{layout.path}:img"
    layer = layout.layers[0]
    client = await Client.connect(daemon.socket_path)
    image = await client.open(ref)
    reply = await client.call("GetBlob", image, layer.digest, layer.size)
    assert reply["success"]
    await client.send("FinishPipe", reply["pipeid"])  # waits for the unread pipe: in-order requests queue behind
    padding = "x" * 2000
    try:
        for _ in range(60):  # 60 x ~2 KiB > 64 KiB
            await client.send("OpenImage", f"oci:/nonexistent/{padding}")
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed by the daemon while we were still sending: what the test expects
    await daemon.wait_for_log(r"client pid \d+ uid 0 queued over 65536 bytes of requests and replies")
    try:
        reply, _ = await client.receive()
    except ConnectionResetError:
        reply = None
    assert reply is None, "the connection should have been closed"
    client.close()
    other = await Client.connect(daemon.socket_path)  # the daemon carries on
    await other.open(ref)
    other.close()


async def _read_exactly(fd: int, size: int) -> None:
    stream = trio.lowlevel.FdStream(os.dup(fd))
    async with stream:
        with trio.fail_after(REPLY_GUARD):
            while size:
                chunk = await stream.receive_some(min(size, 1 << 20))
                assert chunk
                size -= len(chunk)


async def test_queued_bytes_in_all_refuse_with_a_retryable_error(start_daemon, tmp_path: Path, layout) -> None:
    daemon = await start_daemon(
        "--config", config(tmp_path, '[daemon]\nqueued-request-bytes = "64K"\n'), "--insecure-policy"
    )
    ref = f"oci:{layout.path}:img"
    layer = layout.layers[0]
    clients = [await Client.connect(daemon.socket_path) for _ in range(2)]
    padding = "x" * 2000
    pipes = []
    for client in clients:
        image = await client.open(ref)
        reply = await client.call("GetBlob", image, layer.digest, layer.size)
        pipes.append(client.held[-1])
        await client.send("FinishPipe", reply["pipeid"])  # blocks this connection's in-order queue
        for _ in range(20):  # 2 x 20 x ~2 KiB: over 64 KiB together, under it each
            await client.send("OpenImage", f"oci:/nonexistent/{padding}")
    await daemon.wait_for_log(r"client pid \d+ uid 0: request refused: the daemon holds 64 KiB of queued requests")
    refusals = 0
    for client, fd in zip(clients, pipes, strict=True):
        await _read_exactly(fd, layer.size)  # the blob is read: FinishPipe, then the queued requests, are answered
        finished, _ = await client.receive()
        assert finished is not None and finished["success"], finished
        for _ in range(20):  # every request got exactly one reply, in order
            reply, _ = await client.receive()
            assert reply is not None and not reply["success"]
            if "the daemon holds 64 KiB of queued requests and replies from all its clients" in reply["error"]:
                assert reply["error_code"] == "retryable"
                refusals += 1
            else:
                assert "nonexistent" in reply["error"]
        client.close()
    assert refusals > 0
    assert daemon.process.returncode is None
