"""Issue 13, part 5: every error path closes what it opened. The daemon's fds are counted (``/proc/PID/fd``, each
kind told apart with readlink: unix sockets, pipes, files by path, TCP sockets by /proc/PID/net/tcp) before and
after thousands of refused and failed requests of every kind on several connections, which are then closed, some
abruptly with pipes unread. Afterwards the table must be what it was, but for idle pooled connections to the
registry (TCP), which the HTTP pool keeps by design, at most its idle cap.

The daemon runs with ``[limits] open-pipes = 2`` and ``open-images = 3`` so that limits refuse early and often, and
without a request-rate limit so that every request reaches its handler. ``pytest -s`` prints the counts.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.messages import Reply
from tests.support.hostile import FifoImages, connect_as, fifo_images, request, roundtrip

CONFIG = "[limits]\nopen-pipes = 2\nopen-images = 3\nrequests-per-second = 0\n"
OTHER_UID = 4242
OTHER_GID = 4343
#: idle connections the HTTP pool keeps per registry (proxy/http/pool.py, ``max_per_host``)
POOL_IDLE_CAP = 6
#: rounds of each kind of request
REFUSAL_ROUNDS = 300
FAILURE_ROUNDS = 120
OTHER_USER_ROUNDS = 150
ABRUPT_CONNECTIONS = 12
#: how long the fd table may take to settle once every connection is closed
SETTLE = 15.0
HANG_GUARD = 120.0
PIPES_REFUSED = "too many open pipes (2 is this connection's limit)"
UNKNOWN = "sha256:" + "0" * 64


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- the fd table


@dataclass(frozen=True)
class FdTable:
    """The daemon's fds but its listening socket: what each is (``unix``, ``pipe``, ``anon_inode:[eventpoll]``,
    ``/dev/null``, a file's path, ...), and how many are TCP sockets."""

    other: tuple[str, ...]
    tcp: int

    @property
    def kinds(self) -> collections.Counter[str]:
        return collections.Counter(
            "pipe" if target.startswith("pipe:") else "file" if target.startswith("/") else target
            for target in self.other
        )

    def __str__(self) -> str:
        return f"{len(self.other) + self.tcp} ({dict(sorted(self.kinds.items()))}, tcp: {self.tcp})"


def _socket_inodes(pid: int, tables: tuple[str, ...]) -> dict[str, str]:
    """inode → the /proc/net table it is in ("tcp", "unix", ...)."""
    found = {}
    for table in tables:
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            inode = fields[6] if table == "unix" else fields[9]
            found[inode] = table
    return found


def listening_inode(pid: int, socket_path: Path) -> str:
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(socket_path):
            return fields[6]
    raise AssertionError(f"no listening socket at {socket_path} in /proc/{pid}/net/unix")


def fd_table(pid: int, listening: str) -> FdTable:
    sockets = _socket_inodes(pid, ("tcp", "tcp6", "unix"))
    other, tcp = [], 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            if m.group(1) == listening:
                continue
            kind = sockets.get(m.group(1), "socket")
            if kind.startswith("tcp"):
                tcp += 1
                continue
            target = kind
        elif target.startswith("pipe:"):
            target = "pipe:"
        other.append(target)
    return FdTable(tuple(sorted(other)), tcp)


async def without_cache_files(daemon, listening: str, cache: Path) -> FdTable:
    """The fd table once nothing under the cache's ``blobs/`` is open any more (a download finishing in the
    background closes its file and directory fds just after its readers got the last byte; the cache's own
    directory stays open), or as it is after SETTLE s."""
    with trio.move_on_after(SETTLE):
        while any(target.startswith(f"{cache}/blobs/") for target in fd_table(daemon.pid, listening).other):
            await trio.sleep(0.05)  # polling the daemon's fd table, with a deadline
    return fd_table(daemon.pid, listening)


async def settled(daemon, listening: str, baseline: FdTable) -> FdTable:
    """The fd table once it is back to ``baseline`` (TCP at most the pool's idle cap), or as it is after SETTLE s."""
    with trio.move_on_after(SETTLE):
        while True:
            table = fd_table(daemon.pid, listening)
            if table.other == baseline.other and table.tcp <= POOL_IDLE_CAP:
                return table
            await trio.sleep(0.05)  # polling the daemon's fd table, with a deadline
    return fd_table(daemon.pid, listening)


def closed_connections(daemon) -> int:
    return sum(bool(re.search(r"connection from pid \d+ closed", line)) for line in daemon.log)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def traversable() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700, so another user could not even reach a
    FIFO in it)."""
    path = Path(tempfile.mkdtemp(prefix="image-proxy-fds-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def fifos(traversable: Path, single) -> FifoImages:
    return fifo_images(traversable / "fifos", single.path, single.tag, single.layers[0].digest)


@pytest.fixture
def private_layout(traversable: Path) -> str:
    """An image in a 0700 directory of root's: another user's OpenImage is refused by the kernel."""
    private = traversable / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "hello", private / "hello")
    return f"oci:{private}/hello:latest"


# --------------------------------------------------------------------------------------------- helpers


async def drain(fd: int) -> bytes:
    parts = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


async def failure(proxy: ImageProxy, method: str, args: list) -> str:
    """Call ``method``, which must fail: at once (an error reply, no fds), or in its transfer (FinishPipe's error,
    or GetRawBlob's error pipe). The error text."""
    reply, fds = await proxy.call(method, args)
    if not reply.success:
        assert not fds, f"{method} failed and passed {len(fds)} fds"
        return reply.error
    if method == "GetRawBlob":
        data_fd, err_fd = fds
        os.close(data_fd)
        error = await drain(err_fd)
        assert error, f"{method}{args} succeeded"
        return error.decode()
    (fd,) = fds
    finished: list[Reply] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, fd)
        finished.append((await proxy.call("FinishPipe", [reply.pipeid]))[0])
    assert not finished[0].success, f"{method}{args} succeeded"
    return finished[0].error


async def refused(proxy: ImageProxy, method: str, args: list, text: str) -> None:
    reply, fds = await proxy.call(method, args)
    for fd in fds:
        os.close(fd)
    assert not reply.success and text in reply.error, f"{method}{args}: {reply}"


def close_abruptly(sock: trio.socket.SocketType, fds: list[int], socket_first: bool) -> None:
    """A client that vanishes: its socket and its pipes' read ends closed at once, without Shutdown."""
    if socket_first:
        sock.close()
    for fd in fds:
        os.close(fd)
    sock.close()


# --------------------------------------------------------------------------------------------- the tests


async def test_every_refused_and_failed_request_closes_what_it_opened(
    start_daemon, tmp_path, single, registry_images, large_image, fifos, private_layout
):
    if os.geteuid() != 0:
        pytest.fail("one client connects as another user: the test needs root (CI runs as root)")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    daemon = await start_daemon(
        "--blob-cache", str(tmp_path / "cache"), "--config", str(config), "--socket-group", str(OTHER_GID)
    )
    listening = listening_inode(daemon.pid, daemon.socket_path)
    registry_single = registry_images.ref("test/single")
    local_layer = single.layers[0]
    registry_layer = registry_images.single.layers[0]
    big = large_image.layers[0]
    hello = f"oci:{Path(__file__).resolve().parents[2] / 'examples' / 'hello'}:latest"
    connections = 0

    def other_user() -> socket.socket:
        return connect_as(daemon.socket_path, OTHER_UID, OTHER_GID, [OTHER_GID])

    with trio.fail_after(HANG_GUARD):
        # warm up: each transport once, successfully (the pool keeps a registry connection; worker threads start)
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            for ref in (single.ref, registry_single):
                img = await proxy.open_image(ref)
                await proxy.get_manifest(img)
                await proxy.close_image(img)
            img = await proxy.open_image(registry_single)
            assert (
                sha256(await proxy.get_blob(img, registry_layer.digest, registry_layer.size)) == registry_layer.digest
            )
        async with ImageProxy.connect(other_user()) as proxy:
            await proxy.open_image(hello)
        connections += 2
        await daemon.wait_for(lambda: closed_connections(daemon) >= connections, "the warm-up connections closed")
        baseline = fd_table(daemon.pid, listening)

        requests = collections.Counter()
        peak = baseline

        async def sample() -> None:
            nonlocal peak
            while True:
                table = fd_table(daemon.pid, listening)
                if len(table.other) + table.tcp > len(peak.other) + peak.tcp:
                    peak = table
                await trio.sleep(0.1)  # sampling the fd count while the clients work, not synchronising

        async def limits() -> None:
            """Images over the limit; two pipes never finished (GetManifest, GetConfig), then every pipe-producing
            call refused; the connection ends with both pipes unread."""
            async with ImageProxy.connect(daemon.socket_path) as proxy:
                local = await proxy.open_image(single.ref)
                remote = await proxy.open_image(registry_single)
                await proxy.open_image(single.ref)
                for ref in (single.ref, registry_single, *fifos.references) * (REFUSAL_ROUNDS // 20):
                    await refused(proxy, "OpenImage", [ref], "3 images are open, this connection's limit")
                    requests["OpenImage over the images limit"] += 1
                held = []
                for method, img in (("GetManifest", local), ("GetConfig", remote)):
                    reply, fds = await proxy.call(method, [img])
                    assert reply.success, reply
                    held += fds
                for _ in range(REFUSAL_ROUNDS):
                    for method, args in (
                        ("GetBlob", [local, local_layer.digest, local_layer.size]),
                        ("GetBlob", [remote, registry_layer.digest, registry_layer.size]),
                        ("GetRawBlob", [local, local_layer.digest]),
                        ("GetRawBlob", [remote, registry_layer.digest]),
                        ("GetBlobAt", [local, local_layer.digest, [[0, 10]]]),
                        ("GetManifest", [remote]),
                    ):
                        await refused(proxy, method, args, PIPES_REFUSED)
                        requests[f"{method} refused by the open-pipes limit"] += 1
                for fd in held:
                    os.close(fd)

        async def failures() -> None:
            """Unknown digests (layout and registry), ranges outside the blob, TOCs of plain layers, a FIFO blob,
            OpenImage of what is missing, a FIFO, a refusing registry."""
            async with ImageProxy.connect(daemon.socket_path) as proxy:
                local = await proxy.open_image(single.ref)
                remote = await proxy.open_image(registry_single)
                fifo_image = await proxy.open_image(fifos.blob_layout)
                for _ in range(FAILURE_ROUNDS):
                    for what, method, args, text in (
                        ("GetBlob unknown (layout)", "GetBlob", [local, UNKNOWN, 1], ""),
                        ("GetBlob unknown (registry)", "GetBlob", [remote, UNKNOWN, 1], ""),
                        ("GetRawBlob unknown (layout)", "GetRawBlob", [local, UNKNOWN], ""),
                        ("GetRawBlob unknown (registry)", "GetRawBlob", [remote, UNKNOWN], ""),
                        (
                            "GetBlobAt out of range (layout)",
                            "GetBlobAt",
                            [local, local_layer.digest, [[local_layer.size + 10, 5]]],
                            "outside",
                        ),
                        (
                            "GetBlobAt out of range (registry)",
                            "GetBlobAt",
                            [remote, registry_layer.digest, [[0, 1], [registry_layer.size, 1]]],
                            "outside",
                        ),
                        ("GetLayerTOC plain layer (layout)", "GetLayerTOC", [local, local_layer.digest], "no zstd"),
                        ("GetLayerTOC plain layer (registry)", "GetLayerTOC", [remote, registry_layer.digest], ""),
                        ("GetBlob of a FIFO", "GetBlob", [fifo_image, fifos.blob_digest, 1], str(fifos.blob_path)),
                        ("GetRawBlob of a FIFO", "GetRawBlob", [fifo_image, fifos.blob_digest], "FIFO"),
                    ):
                        with trio.fail_after(5):  # a FIFO is refused at once, never waited on
                            error = await failure(proxy, method, args)
                        assert text in error, f"{what}: {error}"
                        if "FIFO" in what:
                            assert "FIFO" in error, f"{what}: {error}"
                        requests[what] += 1

        async def open_failures() -> None:
            """OpenImage of what is missing, of FIFOs where a layout, an index.json, a manifest.json, an archive
            are expected (each an error naming the FIFO, at once)."""
            async with ImageProxy.connect(daemon.socket_path) as proxy:
                for round_ in range(FAILURE_ROUNDS):
                    for what, ref, text in (
                        ("OpenImage missing", f"oci:/nonexistent/{round_}:x", "no such file"),
                        ("OpenImage FIFO index.json", fifos.index_layout, str(fifos.index_path)),
                        ("OpenImage FIFO manifest.json", fifos.dir_image, str(fifos.manifest_path)),
                        ("OpenImage FIFO archive", f"oci-archive:{fifos.fifo}", str(fifos.fifo)),
                        ("OpenImage FIFO layout", f"oci:{fifos.fifo}", str(fifos.fifo)),
                    ):
                        with trio.fail_after(5):  # a FIFO is refused at once, never waited on
                            error = await failure(proxy, "OpenImage", [ref])
                        assert text in error, f"{what}: {error}"
                        if "FIFO" in what and what != "OpenImage FIFO layout":  # a layout is a directory
                            assert "FIFO" in error, f"{what}: {error}"
                        requests[what] += 1

        async def refusing_registry() -> None:
            async with ImageProxy.connect(daemon.socket_path) as proxy, trio.open_nursery() as nursery:
                for n in range(48):  # with ids, at most 32 at work at once: the rest wait for a slot

                    async def open_one(n: int = n) -> None:
                        error = await failure(proxy, "OpenImage", [f"docker://127.0.0.1:1/refused/{n}"])
                        assert "127.0.0.1:1" in error, error
                        requests["OpenImage of a registry refusing connections"] += 1

                    nursery.start_soon(open_one)

        async def another_user() -> None:
            async with ImageProxy.connect(other_user()) as proxy:
                for _ in range(OTHER_USER_ROUNDS):
                    error = await failure(proxy, "OpenImage", [private_layout])
                    assert "permission denied" in error, error
                    error = await failure(proxy, "OpenImage", [fifos.index_layout])
                    assert "FIFO" in error, error
                    error = await failure(proxy, "OpenImage", [f"dir:{fifos.fifo}"])
                    requests["OpenImage of a 0700 directory / a FIFO, as another user"] += 3

        async def abrupt(n: int) -> None:
            """Two transfers started, never read, the socket closed without Shutdown (before or after the pipes)."""
            sock = trio.socket.from_stdlib_socket(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
            await sock.connect(str(daemon.socket_path))
            for packet in (request("Initialize"), request("OpenImage", [large_image.ref])):
                reply, _ = await roundtrip(sock, packet)
                assert reply.success, reply
            blob, unread = await roundtrip(sock, request("GetBlob", [1, big.digest, big.size]))
            method = "GetRawBlob" if n % 2 else "GetManifest"
            other, fds = await roundtrip(sock, request(method, [1, big.digest][: 2 if n % 2 else 1]))
            unread += fds
            assert blob.success and other.success, (blob, other)
            close_abruptly(sock, unread, socket_first=n % 3 == 0)
            requests["connection closed abruptly with pipes unread"] += 1

        async with trio.open_nursery() as sampler:
            sampler.start_soon(sample)
            async with trio.open_nursery() as nursery:
                for job in (limits, failures, open_failures, refusing_registry, another_user):
                    nursery.start_soon(job)
                for n in range(ABRUPT_CONNECTIONS):
                    nursery.start_soon(abrupt, n)
            sampler.cancel_scope.cancel()
        connections += 5 + ABRUPT_CONNECTIONS
        await daemon.wait_for(lambda: closed_connections(daemon) >= connections, "every connection closed")
        after = await settled(daemon, listening, baseline)

    total = sum(requests.values())
    print(f"\nfd accounting: {total} refused or failed requests on {5 + ABRUPT_CONNECTIONS} connections")
    for what, n in sorted(requests.items()):
        print(f"  {n:5d} {what}")
    print(f"fds before: {baseline}\nfds at the peak: {peak}\nfds after:  {after}")
    print(f"before: {baseline.other}\nafter:  {after.other}")
    assert total >= 4000
    assert daemon.process.returncode is None
    leaked = collections.Counter(after.other) - collections.Counter(baseline.other)
    missing = collections.Counter(baseline.other) - collections.Counter(after.other)
    assert not leaked and not missing, f"fds left behind: {dict(leaked)}; fds gone: {dict(missing)}"
    assert after.tcp <= POOL_IDLE_CAP, f"{after.tcp} TCP connections left, over the pool's idle cap {POOL_IDLE_CAP}"
    problems = [line for line in daemon.log if "Traceback" in line or "internal error" in line]
    assert not problems, "\n".join(line[:3000] for line in problems[:3])


async def test_300_refusals_by_the_open_pipes_limit_leave_the_connection_able_to_pull(
    start_daemon, tmp_path, single, registry_images
):
    """The leak the issue found: "300 refusals leave 300 descriptors for good". Refused GetBlobs (of a layout's
    blob and a registry's) cost no fd, and once its pipes are finished the connection pulls as before."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    daemon = await start_daemon("--blob-cache", str(tmp_path / "cache"), "--config", str(config))
    listening = listening_inode(daemon.pid, daemon.socket_path)
    layer = single.layers[0]
    registry_single = registry_images.ref("test/single")
    remote_layer = registry_images.single.layers[0]
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            local = await proxy.open_image(single.ref)
            remote = await proxy.open_image(registry_single)
            held = []
            for method, img in (("GetManifest", local), ("GetConfig", remote)):
                reply, fds = await proxy.call(method, [img])
                assert reply.success, reply
                held.append((reply, fds[0]))
            before = await without_cache_files(daemon, listening, tmp_path / "cache")
            for n in range(300):
                img, blob = (local, layer) if n % 2 else (remote, remote_layer)
                await refused(proxy, "GetBlob", [img, blob.digest, blob.size], PIPES_REFUSED)
            after_refusals = fd_table(daemon.pid, listening)
            for reply, fd in held:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain, fd)
                    await proxy.finish_pipe(reply.pipeid)
            pulled = [
                sha256(await proxy.get_blob(local, layer.digest, layer.size)),
                sha256(await proxy.get_blob(remote, remote_layer.digest, remote_layer.size)),
            ]
            after_pull = fd_table(daemon.pid, listening)
    print(f"\n300 refusals: fds before {before}\n  after the refusals {after_refusals}\n  after the pulls {after_pull}")
    assert after_refusals.other == before.other, "refused GetBlobs left fds behind"
    assert pulled == [layer.digest, remote_layer.digest]
    assert len(after_pull.other) <= len(before.other) - 2, "the finished pipes' fds are still open"


async def test_a_client_vanishing_mid_transfer_never_makes_the_daemon_use_a_closed_fd(
    start_daemon, tmp_path, large_image
):
    """Clients that close their socket and the read ends of their pipes at once, while the daemon sends a blob into
    them from its cache (sendfile): each producer ends quietly, never writing to (or reading from) an fd number the
    session has closed meanwhile, which another client's pipe or socket may be by then."""
    daemon = await start_daemon("--blob-cache", str(tmp_path / "cache"))
    listening = listening_inode(daemon.pid, daemon.socket_path)
    big = large_image.layers[0]
    # one whole connection first: the daemon has then closed the socket it sent READY=1 on (it may still be open
    # when READY=1 arrives here, and counted in the baseline it would be missing at the end)
    warm_up = trio.socket.from_stdlib_socket(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    await warm_up.connect(str(daemon.socket_path))
    assert (await roundtrip(warm_up, request("Initialize")))[0].success
    warm_up.close()
    await daemon.wait_for(lambda: closed_connections(daemon) >= 1, "the first connection closed")
    baseline = fd_table(daemon.pid, listening)
    clients = 40

    async def vanish(n: int) -> None:
        sock = trio.socket.from_stdlib_socket(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        await sock.connect(str(daemon.socket_path))
        for packet in (request("Initialize"), request("OpenImage", [large_image.ref])):
            reply, _ = await roundtrip(sock, packet)
            assert reply.success, reply
        reply, fds = await roundtrip(sock, request("GetBlob", [1, big.digest, big.size]))
        assert reply.success, reply
        os.read(fds[0], 4096)  # the transfer is under way
        close_abruptly(sock, fds, socket_first=n % 2 == 0)

    with trio.fail_after(HANG_GUARD):
        for round_ in range(3):  # the download, then from the cache
            async with trio.open_nursery() as nursery:
                for n in range(clients):
                    nursery.start_soon(vanish, n)
            closed = clients * (round_ + 1) + 1  # with the warm-up's
            await daemon.wait_for(lambda closed=closed: closed_connections(daemon) >= closed, "every connection closed")
        after = await settled(daemon, listening, baseline)
    failed = [line for line in daemon.log if "producer failed" in line or "Traceback" in line]
    print(f"\n{clients * 3} clients vanished mid-transfer: {len(failed)} producers failed; fds {baseline} -> {after}")
    assert not failed, f"{len(failed)} producers failed, e.g.\n{failed[0][:3000]}"
    assert after.other == baseline.other
