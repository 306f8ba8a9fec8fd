"""No client waits on another's unread pipe (issue 13, part 4).

A blob producer blocked on a pipe nobody reads holds its own registry connection and nothing else: not a pool
slot another request needs. Checked with the real docker-registry, an image of 8 layers each far larger than
what the pipe and the sockets' buffers hold, and raw protocol clients that do not read their pipes:

(a) one spawned proxy gets GetBlob for all 8 layers before any pipe is read (skopeo serves this; the 7th used
    to get no reply), then the pipes are read at once and finished in a shuffled order;
(b) 8 clients of one daemon each hold an unread pipe from the registry while a ninth opens the image and pulls
    a blob from it in its normal time;
(c) the same with request ids, pipelined.
"""

from __future__ import annotations

import array
import hashlib
import json
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from proxy.common.pipes import CHUNK_SIZE, PIPE_SIZE_CAP
from tests.support.images import ImageSpec, LayerSpec, build_oci_layout, pseudo_random, skopeo_copy
from tests.support.registry import PushedImages

LAYERS = 8
#: each layer far larger than what a producer blocked on its pipe has read (a pipe buffer and one chunk)
LAYER_SIZE = 16 << 20
#: how long a reply may take on a loaded 2-core machine; the old code never answered at all
REPLY_BOUND = 15.0
#: the ninth client's whole pull of one layer, idem
PULL_BOUND = 30.0
_FDS = socket.CMSG_SPACE(4 * array.array("i").itemsize)
#: digest → size of the layers, for readers that must read exactly a blob's size
LAYER_SIZE_OF: dict[str, int] = {}


@dataclass(frozen=True)
class EightLayers:
    ref: str
    layers: tuple[tuple[str, int], ...]  # (digest, size)


@pytest.fixture(scope="session")
def eight_layers(registry_images: PushedImages, tmp_path_factory: pytest.TempPathFactory) -> EightLayers:
    spec = ImageSpec(
        layers=tuple(
            LayerSpec({f"layer{i}.bin": pseudo_random(f"slow-reader-{i}", LAYER_SIZE)}) for i in range(LAYERS)
        ),
        gzip_level=0,
    )
    layout = build_oci_layout(tmp_path_factory.mktemp("eight") / "layout", {"eight": spec})
    image = layout.images["eight"]
    registry = registry_images.registry
    skopeo_copy(
        f"oci:{layout.path}:eight", f"docker://{registry.authority}/test/eight:latest", "--dest-tls-verify=false"
    )
    return EightLayers(
        ref=f"docker://{registry.authority}/test/eight:latest",
        layers=tuple((layer.digest, layer.size) for layer in image.layers),  # type: ignore[union-attr]
    )


class RawClient:
    """A protocol client that does nothing it is not told: replies are read when asked, pipes never."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._next_id = 1

    async def send(self, method: str, *args: object, request_id: int | None = None) -> None:
        doc: dict[str, object] = {"method": method, "args": list(args)}
        if request_id is not None:
            doc["id"] = request_id
        await self.sock.send(json.dumps(doc).encode())

    async def receive(self) -> tuple[dict, list[int]]:
        with trio.fail_after(REPLY_BOUND):
            data, ancdata, _, _ = await self.sock.recvmsg(32 * 1024, _FDS)
        assert data, "the server closed the connection"
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return json.loads(data), list(fds)

    async def call(self, method: str, *args: object) -> tuple[dict, list[int]]:
        await self.send(method, *args)
        reply, fds = await self.receive()
        assert reply["success"], f"{method} failed: {reply['error']}"
        return reply, fds

    async def open(self, ref: str) -> int:
        await self.call("Initialize")
        reply, _ = await self.call("OpenImage", ref)
        return reply["value"]


async def read_pipe(fd: int, size: int) -> str:
    """Read ``size`` bytes from a pipe (its write end stays open until FinishPipe: no EOF before); the sha256
    digest of what came."""
    digest = hashlib.sha256()
    stream = trio.lowlevel.FdStream(fd)
    async with stream:
        with trio.fail_after(PULL_BOUND):
            while size:
                chunk = await stream.receive_some(min(size, 1 << 20))
                assert chunk, "the pipe ended early"
                digest.update(chunk)
                size -= len(chunk)
    return "sha256:" + digest.hexdigest()


async def spawned(argv: list[str]) -> tuple[RawClient, trio.Process]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = await trio.lowlevel.open_process(argv, stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    return RawClient(trio.socket.from_stdlib_socket(ours)), process


async def connected(path: Path) -> RawClient:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await sock.connect(str(path))
    return RawClient(sock)


async def read_all_then_finish(client: RawClient, pipes: dict[int, tuple[int, str]], ids: bool) -> None:
    """Read every pipe at once; then FinishPipe each, in a shuffled order; all bytes and all finishes right."""
    got: dict[int, str] = {}
    async with trio.open_nursery() as nursery:

        async def read(pipeid: int, fd: int) -> None:
            got[pipeid] = await read_pipe(fd, LAYER_SIZE_OF[pipes[pipeid][1]])

        for pipeid, (fd, _) in pipes.items():
            nursery.start_soon(read, pipeid, fd)
    assert got == {pipeid: digest for pipeid, (_, digest) in pipes.items()}
    order = list(pipes)
    random.Random(13).shuffle(order)
    for n, pipeid in enumerate(order):
        await client.send("FinishPipe", pipeid, request_id=1000 + n if ids else None)
    for _ in order:
        reply, _ = await client.receive()
        assert reply["success"], reply["error"]


@pytest.mark.parametrize("ids", [False, True], ids=["in-order", "request-ids"])
async def test_one_connection_gets_every_getblob_answered_before_reading_any_pipe(
    eight_layers: EightLayers, our_proxy_argv: list[str], ids: bool
) -> None:
    client, process = await spawned([*our_proxy_argv, "--tls-verify=false"])
    try:
        image = await client.open(eight_layers.ref)
        if ids:  # all eight at once; replies in any order
            for n, (digest, size) in enumerate(eight_layers.layers):
                await client.send("GetBlob", image, digest, size, request_id=n)
        pipes: dict[int, tuple[int, str]] = {}
        for n, (digest, size) in enumerate(eight_layers.layers):
            if not ids:
                await client.send("GetBlob", image, digest, size)
            reply, fds = await client.receive()  # the old pool answered six, then nothing
            assert reply["success"], f"GetBlob {n + 1}: {reply['error']}"
            wanted = eight_layers.layers[reply["id"]][0] if ids else digest
            pipes[reply["pipeid"]] = (fds[0], wanted)
        assert len(pipes) == LAYERS
        LAYER_SIZE_OF.update(eight_layers.layers)
        await read_all_then_finish(client, pipes, ids)
        await client.send("Shutdown")
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        client.sock.close()
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


@pytest.mark.parametrize("ids", [False, True], ids=["in-order", "request-ids"])
async def test_eight_clients_with_unread_pipes_do_not_slow_a_ninth(
    start_daemon, eight_layers: EightLayers, ids: bool
) -> None:
    # no cache: every GetBlob streams from the registry through its own connection, the case that held slots
    daemon = await start_daemon("--no-blob-cache")
    hogs: list[RawClient] = []
    held: list[int] = []
    try:
        for n, (digest, size) in enumerate(eight_layers.layers):
            hog = await connected(daemon.socket_path)
            hogs.append(hog)
            image = await hog.open(eight_layers.ref)
            await hog.send("GetBlob", image, digest, size, request_id=n if ids else None)
            reply, fds = await hog.receive()
            assert reply["success"], f"client {n + 1}: {reply['error']}"
            held.extend(fds)  # never read
        ninth = await connected(daemon.socket_path)
        hogs.append(ninth)
        digest, size = eight_layers.layers[3]
        started = trio.current_time()
        with trio.fail_after(PULL_BOUND):
            image = await ninth.open(eight_layers.ref)
            await ninth.send("GetBlob", image, digest, size, request_id=77 if ids else None)
            reply, fds = await ninth.receive()
            assert reply["success"], reply["error"]
            assert await read_pipe(fds[0], size) == digest
            await ninth.send("FinishPipe", reply["pipeid"], request_id=78 if ids else None)
            finished, _ = await ninth.receive()
            assert finished["success"], finished["error"]
        elapsed = trio.current_time() - started
        print(f"ninth client: OpenImage + {size >> 20} MiB blob in {elapsed:.2f} s beside 8 unread pipes")
        assert daemon.process.returncode is None
    finally:
        for fd in held:
            trio.lowlevel.FdStream(fd).close()
        for hog in hogs:
            hog.sock.close()


def test_layer_size_exceeds_what_a_blocked_producer_holds() -> None:
    # the premise of the tests above: a producer blocked on an unread pipe has read at most the pipe's buffer and
    # one chunk of the body, so its response is not complete and its connection stays open (whatever the kernel
    # buffers on the socket, the producer has not read it)
    pipe_max = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert min(pipe_max, PIPE_SIZE_CAP) + CHUNK_SIZE < LAYER_SIZE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
