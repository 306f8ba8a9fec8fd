"""Issue 13, part 8: a hostile neighbour. One real daemon; client A (root) pulls a 48 MiB layer from the registry
and checks its digest, again and again, while client B (another user, on connections of its own) sends thousands
of malformed and hostile requests (tests/support/hostile.py), misuses FinishPipe, opens and closes images as fast
as it can, leaves pipes of the same layer unread and shuts a connection down mid-stream. B reads every reply: each
request that must be answered gets exactly one well-formed reply. At the end the daemon is alive, A's bytes are
right and its pulls were not starved, a new client C gets a manifest at once, and the log holds no traceback.

The daemon runs with its defaults but one: the request-rate limit is lifted, so that each of B's requests reaches
its handler instead of being refused by the token bucket (tests/daemon/test_daemon.py tests the limit itself).
``pytest -s`` prints the figures.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.codec import decode_reply
from protocol.errors import ProtocolViolation
from tests.support.hostile import Tally, Target, connect_as, drive, generate, request, roundtrip

HOSTILE_UID = 4242
HOSTILE_GID = 4343
#: B's flooding connections, and the generated requests each sends
FLOOD_CONNECTIONS = 3
REQUESTS_PER_CONNECTION = 2500
#: pipes of A's layer each flooding connection leaves unread (GetBlob), and raw transfers (GetRawBlob)
UNREAD_BLOBS = 3
UNREAD_RAW_BLOBS = 1
#: requests sent right before Shutdown, without waiting for their replies (as many follow it)
SHUTDOWN_BURST_BEFORE = 50
#: rounds of rapid OpenImage / CloseImage
OPEN_CLOSE_ROUNDS = 150
#: one pull of A's 48 MiB layer may take this long while B floods (about half a second on an idle machine)
A_PULL_BOUND = 20.0
#: C's OpenImage and GetManifest, together
C_BOUND = 2.0
#: the whole test
HANG_GUARD = 120.0
#: what the daemon closes a connection for, documented (README, docs/PROTOCOL.md): a client that does not read
DOCUMENTED_CLOSES = (r"sent over \d+ requests without reading replies", r"queued over \d+ bytes of requests")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class HostilePaths:
    #: local references B names: FIFOs where a layout, an archive, an index.json and a dir: manifest are expected,
    #: a directory only root may read
    references: tuple[str, ...]
    #: an image every user may read (examples/hello, copied where B can reach it)
    public_image: str


@pytest.fixture
def hostile_paths() -> Iterator[HostilePaths]:
    """Local images in a directory B (another user) can traverse (pytest's tmp_path is root's, 0700)."""
    root = Path(tempfile.mkdtemp(prefix="image-proxy-hostile-"))
    root.chmod(0o755)
    example = Path(__file__).resolve().parents[2] / "examples" / "hello"
    fifo = root / "fifo"
    os.mkfifo(fifo, 0o666)
    layout = root / "layout-with-fifo-index"
    layout.mkdir(mode=0o755)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    os.mkfifo(layout / "index.json", 0o666)
    dir_image = root / "dir-with-fifo-manifest"
    dir_image.mkdir(mode=0o755)
    os.mkfifo(dir_image / "manifest.json", 0o666)
    private = root / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(example, private / "hello")
    public = root / "hello"
    shutil.copytree(example, public)
    for directory, _subdirs, files in os.walk(public):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(Path(directory) / name, 0o644)
    references = (
        f"oci:{fifo}",
        f"oci:{fifo}:tag",
        f"dir:{fifo}",
        f"oci-archive:{fifo}",
        f"docker-archive:{fifo}",
        f"oci:{layout}",
        f"oci:{layout}:latest",
        f"dir:{dir_image}",
        f"oci:{private}/hello:latest",
        f"oci:{private}",
        f"dir:{private}",
        f"oci:{root}/../{root.name}/private/hello",
    )
    yield HostilePaths(references, f"oci:{public}:latest")
    shutil.rmtree(root)


async def read_all(fd: int, sink) -> int:
    total = 0
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(1 << 20):
            sink(chunk)
            total += len(chunk)
    return total


def hostile_socket(daemon) -> trio.socket.SocketType:
    return trio.socket.from_stdlib_socket(connect_as(daemon.socket_path, HOSTILE_UID, HOSTILE_GID, [HOSTILE_GID]))


class Neighbour:
    """Client B: the figures of all its connections, and the read ends it holds unread until ``release``."""

    def __init__(self) -> None:
        self.tallies: list[tuple[str, Tally]] = []
        self.held: list[int] = []
        self.sockets: list[trio.socket.SocketType] = []
        self.scripted_requests = 0
        self.scripted_replies = 0
        #: the burst around Shutdown: packets sent (Shutdown included), and replies (only what came before it may be)
        self.burst_sent = 0
        self.burst_answered = 0

    @property
    def sent(self) -> int:
        """Requests that must be answered, and were (or the test failed)."""
        return sum(t.sent for _, t in self.tallies) + self.scripted_requests

    @property
    def replies(self) -> int:
        return sum(t.replies for _, t in self.tallies) + self.scripted_replies

    async def call(self, sock: trio.socket.SocketType, packet: bytes):
        self.scripted_requests += 1
        reply, fds = await roundtrip(sock, packet)
        self.scripted_replies += 1
        return reply, fds

    async def open_target(self, sock, registry_single: str, large_image) -> Target:
        """Initialize, open the registry's small image (id 1) and A's large one (id 2); leave pipes of A's layer
        unread."""
        reply, _ = await self.call(sock, request("Initialize"))
        assert reply.success, reply
        reply, _ = await self.call(sock, request("OpenImage", [registry_single]))
        assert reply.success and reply.value == 1, reply
        reply, _ = await self.call(sock, request("GetLayerInfo", [1]))
        layer = reply.value[0]
        reply, _ = await self.call(sock, request("OpenImage", [large_image.ref]))
        assert reply.success and reply.value == 2, reply
        big = large_image.layers[0]
        for _ in range(UNREAD_BLOBS):
            reply, fds = await self.call(sock, request("GetBlob", [2, big.digest, big.size]))
            assert reply.success and len(fds) == 1, reply
            self.held += fds
        for _ in range(UNREAD_RAW_BLOBS):
            reply, fds = await self.call(sock, request("GetRawBlob", [2, big.digest]))
            assert reply.success and len(fds) == 2, reply
            self.held += fds
        return Target(image_id=1, digest=layer["digest"], size=layer["size"])

    async def flood(self, daemon, seed: int, registry_single: str, large_image, references: tuple[str, ...]) -> None:
        """One connection's flood; the connection stays open (with its unread pipes) until ``close``."""
        sock = hostile_socket(daemon)
        self.sockets.append(sock)
        target = await self.open_target(sock, registry_single, large_image)
        target = Target(target.image_id, target.digest, target.size, references=references)
        cases = generate(seed, REQUESTS_PER_CONNECTION, target)
        tally = await drive(sock, cases, rng=random.Random(seed), held=self.held, deadline=HANG_GUARD / 2)
        self.tallies.append((f"flood {seed}", tally))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for fd in self.held:
            os.close(fd)
        self.held.clear()

    async def finish_pipe_misuse(self, daemon, registry_single: str, large_image) -> None:
        """FinishPipe twice, before reading, on id 0, on a pipe of another connection, twice at once while a
        producer waits for a reader that never comes."""
        big = large_image.layers[0]
        async with (
            ImageProxy.connect(connect_as(daemon.socket_path, HOSTILE_UID, HOSTILE_GID, [HOSTILE_GID])) as p,
            ImageProxy.connect(connect_as(daemon.socket_path, HOSTILE_UID, HOSTILE_GID, [HOSTILE_GID])) as q,
        ):
            assert p.uses_request_ids

            async def call(proxy, method, args, **kw):
                self.scripted_requests += 1
                out = await proxy.call(method, args, **kw)
                self.scripted_replies += 1
                return out

            img = await p.open_image(registry_single)
            reply, (fd,) = await call(p, "GetManifest", [img])
            finished, _ = await call(p, "FinishPipe", [reply.pipeid])  # before reading: a manifest fits the pipe
            assert finished.success, finished
            parts: list[bytes] = []
            await read_all(fd, parts.append)
            assert sha256(b"".join(parts)) == reply.value
            again, _ = await call(p, "FinishPipe", [reply.pipeid])
            assert not again.success and f"no active pipe {reply.pipeid}" in again.error
            zero, _ = await call(p, "FinishPipe", [0])
            assert not zero.success and "no active pipe 0" in zero.error

            other = await q.open_image(registry_single)
            theirs, (their_fd,) = await call(q, "GetManifest", [other])
            stolen, _ = await call(p, "FinishPipe", [theirs.pipeid])
            assert not stolen.success and f"no active pipe {theirs.pipeid}" in stolen.error
            os.close(their_fd)
            owned, _ = await call(q, "FinishPipe", [theirs.pipeid])
            assert owned.success or owned.error_code == "EPIPE", owned

            large = await p.open_image(large_image.ref)
            blob, (blob_fd,) = await call(p, "GetBlob", [large, big.digest, big.size])
            first: list = []
            async with trio.open_nursery() as nursery:

                async def finish_first() -> None:
                    first.append(await call(p, "FinishPipe", [blob.pipeid]))

                nursery.start_soon(finish_first)
                # an in-order call answered after it was sent: the first FinishPipe is waiting in the daemon
                await call(p, "GetCapabilities", [], ordered=True)
                assert not first, "FinishPipe of a pipe nobody reads returned before its read end closed"
                second, _ = await call(p, "FinishPipe", [blob.pipeid])
                assert not second.success and "already being finished by another request" in second.error
                os.close(blob_fd)  # the reader goes away: the producer fails, the first FinishPipe ends
            ((ended, _),) = first
            assert not ended.success and ended.error_code == "EPIPE", ended

    async def open_close(self, daemon, registry_single: str, hello: str) -> None:
        """OpenImage and CloseImage as fast as the replies come, with ids, in parallel; every id closed twice."""
        async with ImageProxy.connect(connect_as(daemon.socket_path, HOSTILE_UID, HOSTILE_GID, [HOSTILE_GID])) as p:

            async def open_one(ref: str, ids: list[int]) -> None:
                self.scripted_requests += 1
                reply, _ = await p.call("OpenImage", [ref])
                self.scripted_replies += 1
                assert reply.success, reply
                ids.append(reply.value)

            async def close_one(image_id: int) -> None:
                self.scripted_requests += 2
                closed, _ = await p.call("CloseImage", [image_id])
                again, _ = await p.call("CloseImage", [image_id])
                self.scripted_replies += 2
                assert closed.success, closed
                assert not again.success and f"no image {image_id}" in again.error, again

            for round_ in range(OPEN_CLOSE_ROUNDS):
                ids: list[int] = []
                async with trio.open_nursery() as nursery:
                    for ref in (hello, hello, registry_single) if round_ % 10 == 0 else (hello, hello):
                        nursery.start_soon(open_one, ref, ids)
                async with trio.open_nursery() as nursery:
                    for image_id in ids:
                        nursery.start_soon(close_one, image_id)

    async def shutdown_mid_stream(self, daemon, registry_single: str, large_image, references) -> None:
        """A connection that sends Shutdown among a burst of requests, with a transfer in flight: it is closed at
        once; whatever it was answered is well-formed; the daemon carries on."""
        sock = hostile_socket(daemon)
        with sock:
            target = await self.open_target(sock, registry_single, large_image)
            target = Target(target.image_id, target.digest, target.size, references=references)
            cases = generate(1000, 300, target)
            tally = await drive(sock, cases[:150], rng=random.Random(1000), held=self.held, deadline=HANG_GUARD / 2)
            self.tallies.append(("before Shutdown", tally))
            burst = [case.packet for case in cases[150 : 150 + SHUTDOWN_BURST_BEFORE]] + [request("Shutdown")]
            burst += [case.packet for case in cases[150 + SHUTDOWN_BURST_BEFORE :]]
            sent = 0
            for packet in burst:
                try:
                    await sock.send(packet)
                except OSError:  # the daemon has closed it already
                    break
                sent += 1
            self.burst_sent = sent
            answered = 0
            with trio.fail_after(10):
                while True:
                    try:
                        data, ancdata, _, _ = await sock.recvmsg(1 << 16, 1024)
                    except ConnectionResetError:
                        # closed with our last requests unread: the kernel reports that once, then hands over
                        # what was sent before and the end of the connection
                        continue
                    for _, _, payload in ancdata:
                        for fd in memoryview(payload).cast("i"):
                            os.close(fd)
                    if not data:
                        break
                    try:
                        decode_reply(data)
                    except ProtocolViolation as e:
                        raise AssertionError(f"malformed reply {data[:300]!r} after Shutdown: {e}") from None
                    answered += 1
            self.burst_answered = answered
            assert answered <= SHUTDOWN_BURST_BEFORE, f"{answered} replies: requests after Shutdown were answered"


async def pull(socket_path: Path, ref: str, layer) -> float:
    """One pull of ``layer`` over a new connection, its digest checked; the seconds GetBlob took."""
    async with ImageProxy.connect(socket_path) as proxy:
        img = await proxy.open_image(ref)
        digest = hashlib.sha256()
        started = trio.current_time()
        with trio.fail_after(A_PULL_BOUND):
            size = await proxy.copy_blob(img, layer.digest, layer.size, digest.update)
        took = trio.current_time() - started
    assert size == layer.size and "sha256:" + digest.hexdigest() == layer.digest
    return took


async def test_a_hostile_neighbour_cannot_crash_starve_or_slow_the_daemon(
    start_daemon, tmp_path, large_image, registry_images, single, hostile_paths
):
    if os.geteuid() != 0:
        pytest.fail("the hostile neighbour connects as another user: the test needs root (CI runs as root)")
    config = tmp_path / "config.toml"
    config.write_text("[limits]\nrequests-per-second = 0\n")
    daemon = await start_daemon("--no-blob-cache", "--config", str(config), "--socket-group", str(HOSTILE_GID))
    layer = large_image.layers[0]
    registry_single = registry_images.ref("test/single")
    references = hostile_paths.references
    megabytes = layer.size / 1e6

    alone = await pull(daemon.socket_path, large_image.ref, layer)
    b = Neighbour()
    pulls: list[float] = []
    flood_done = trio.Event()
    figures: dict[str, float] = {}
    try:
        with trio.fail_after(HANG_GUARD):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def client_a() -> None:
                    while not flood_done.is_set() or len(pulls) < 2:
                        pulls.append(await pull(daemon.socket_path, large_image.ref, layer))

                nursery.start_soon(client_a)
                async with trio.open_nursery() as client_b:
                    for seed in range(FLOOD_CONNECTIONS):
                        client_b.start_soon(b.flood, daemon, seed, registry_single, large_image, references)
                    client_b.start_soon(b.finish_pipe_misuse, daemon, registry_single, large_image)
                    client_b.start_soon(b.open_close, daemon, registry_single, hostile_paths.public_image)
                    client_b.start_soon(b.shutdown_mid_stream, daemon, registry_single, large_image, references)
                flood_done.set()
                figures["flood"] = trio.current_time() - started
                # C: a newcomer while B still holds its connections and unread pipes
                c_started = trio.current_time()
                async with ImageProxy.connect(daemon.socket_path) as c:
                    img = await c.open_image(single.ref)
                    digest, _ = await c.get_manifest(img)
                figures["c"] = trio.current_time() - c_started
                assert digest == single.manifest_digest
                figures["held"] = len(b.held)
    finally:
        b.close()

    flood_time, c_time = figures["flood"], figures["c"]
    during = [megabytes / took for took in pulls]
    tallies = [tally for _, tally in b.tallies]
    print(
        f"\nhostile neighbour: B sent {b.sent + b.burst_sent} requests on {FLOOD_CONNECTIONS + 4} connections in "
        f"{flood_time:.1f} s and got {b.replies + b.burst_answered} replies: {b.replies} to the {b.sent} requests "
        f"that must be answered, {b.burst_answered} in the burst of {b.burst_sent} around Shutdown (Shutdown "
        f"included, {SHUTDOWN_BURST_BEFORE} before it); {sum(t.successes for t in tallies)} successes, "
        f"{sum(t.internal_errors for t in tallies)} internal errors, {sum(t.fds for t in tallies)} fds passed, "
        f"{figures['held']:.0f} read ends held unread\n"
        f"A: {len(pulls)} pulls of {megabytes:.0f} MB during the flood at {min(during):.0f}-{max(during):.0f} MB/s "
        f"(median {sorted(during)[len(during) // 2]:.0f}); alone {megabytes / alone:.0f} MB/s\n"
        f"C: OpenImage + GetManifest in {c_time * 1000:.0f} ms"
    )
    for name, tally in b.tallies:
        print(f"  {name}: sent {tally.sent} replies {tally.replies} closed {tally.closed} {dict(tally.kinds)}")

    assert daemon.process.returncode is None, "the daemon died"
    for name, tally in b.tallies:
        if tally.closed is not None:
            reasons = [line for line in daemon.log if any(re.search(p, line) for p in DOCUMENTED_CLOSES)]
            assert reasons, f"{name}: the daemon closed B's connection ({tally.closed}) for no documented reason"
            tally.unanswered.clear()
        assert not tally.problems(), f"{name}:\n" + "\n".join(tally.problems())
        assert tally.replies == tally.sent, f"{name}: {tally.sent} requests, {tally.replies} replies"
    assert max(pulls) < A_PULL_BOUND
    assert c_time < C_BOUND, f"C waited {c_time:.1f} s for a manifest"
    # ... and once B is gone
    async with ImageProxy.connect(daemon.socket_path) as c:
        with trio.fail_after(C_BOUND):
            img = await c.open_image(large_image.ref)
            digest, _ = await c.get_manifest(img)
    assert digest == large_image.manifest_digest
    assert daemon.process.returncode is None
    problems = [line for line in daemon.log if "Traceback" in line or "internal error" in line]
    # the exception each traceback ends with (the log writes a traceback on one line, its lines joined by " | ")
    summary = collections.Counter(
        re.sub(r"'\\u[0-9a-f]{4}'|position [\d-]+", "...", line.rsplit(" | ", 1)[-1]) for line in problems
    )
    assert not problems, (
        f"{len(problems)} log lines with a traceback or an internal error:\n"
        + "\n".join(f"{n} x {text}" for text, n in summary.most_common())
        + "\nthe first:\n"
        + problems[0]
    )
