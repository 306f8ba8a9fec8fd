"""The fault matrix of issue 4: the daemon, the real registry, and the fault proxy between them.

Every test asserts correct bytes (every delivered byte compared with the blob) or a reported error, a bounded
time, and no leaked tasks or fds in the daemon. The daemon is spawned here (not with ``ImageProxy.spawn``) so
that its pid is known: after each case its fds are compared with a baseline (pipes and everything else: equal;
TCP connections to the fault proxy: exactly the idle ones the proxy still has open) and no exchange may still
be held open by a producer (a leaked task stuck on a stalled connection would keep one busy).
``trio.fail_after`` is a hang guard only.

With ``--stall-timeout 1 --max-resumes 3`` the README's bound for a blob that stops for good is four stalls
(the one that stopped it and three resumes that bring nothing) plus three re-requests: about 4 s here.

Every case runs twice (see conftest.py): ``[plain-...]`` with the fault proxy speaking plain HTTP (the daemon's
TLS attempt refused, then its fallback), ``[tls-...]`` with it terminating TLS, so each fault reaches the daemon
inside TLS (a reset is still a TCP RST, a close a FIN without close_notify). Each case also checks that the
daemon spoke exactly what the proxy serves (``assert_transport_used``): a silent fallback cannot pass.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from protocol.client import DEFAULT_ARGV, ImageProxy, ProxyClosed
from protocol.errors import ErrorCode, ProxyError
from tests.faults.conftest import FaultImages, Layer
from tests.faults.proxy import (
    Action,
    Answer,
    Close,
    Drip,
    FaultProxy,
    Flip,
    RequestRecord,
    Reset,
    Stall,
    StripRange,
    WrongContentRange,
)
from tests.faults.transport import assert_transport_used

STALL = 1.0
MAX_RESUMES = 3
FLAGS = ("--tls-verify=false", "--stall-timeout", str(int(STALL)), "--max-resumes", str(MAX_RESUMES))
#: the same daemon, with the default 30 s stall deadline: a stall then lasts for the whole test
LONG_STALL_FLAGS = ("--tls-verify=false", "--max-resumes", str(MAX_RESUMES))
#: a hang guard only
HANG_GUARD = 30.0
#: the process must be gone this long after Shutdown or EOF (target 1 s; slack for a loaded CI machine, as in
#: tests/integration/test_server.py)
EXIT_BOUND = 2.0
#: FinishPipe's answer for a blob that stops for good: (1 + resumes) stalls, re-requests and slack
GIVE_UP_BOUND = (1 + MAX_RESUMES) * STALL + 5.0
#: the seed case: a 2,759,859-byte blob whose CDN stopped after 76 %
SEED_OFFSET = 2_107_617
#: how long waiting for the fault proxy and the daemon's fds to settle after a case may take
SETTLE = 10.0
#: a stalled read is given up one stall deadline after its last byte, plus at most this (a new connection, TLS
#: handshake included, and the re-request; slack for a loaded machine)
STALL_SLACK = 2.0


# ----------------------------------------------------------------------------------------------- the daemon


@attrs.frozen
class Fds:
    """The daemon's open fds: pipes, TCP connections to the fault proxy (by the daemon's local port), the rest."""

    pipes: int
    to_proxy: frozenset[int]
    other: int


def _tcp_inodes_to(pid: int, port: int) -> dict[str, int]:
    """socket inode -> local port, for the TCP sockets in ``pid``'s namespace connected to ``port``."""
    found: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(remote.rsplit(":", 1)[1], 16) == port:
                found[inode] = int(local.rsplit(":", 1)[1], 16)
    return found


def fds_of(pid: int, proxy_port: int) -> Fds:
    tcp = _tcp_inodes_to(pid, proxy_port)
    pipes = other = 0
    ports: set[int] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        inode = target[len("socket:[") : -1] if target.startswith("socket:[") else None
        if inode is not None and inode in tcp:
            ports.add(tcp[inode])
        elif target.startswith("pipe:"):
            pipes += 1
        else:
            other += 1
    return Fds(pipes, frozenset(ports), other)


@attrs.define
class Daemon:
    proxy: ImageProxy
    process: trio.Process
    fault: FaultProxy
    baseline: Fds | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def fds(self) -> Fds:
        return fds_of(self.pid, self.fault.port)

    async def open(self, images: FaultImages, repository: str = "test/faults") -> int:
        """OpenImage through the fault proxy (and GetManifest, checked), then take the fd baseline."""
        image = await self.proxy.open_image(images.ref(self.fault.port, repository))
        digest, manifest = await self.proxy.get_manifest(image)
        if repository == "test/faults":
            assert (digest, manifest) == (images.manifest_digest, images.manifest)
        if self.baseline is None:
            await self.settle()
            self.baseline = self.fds()
        return image

    async def settle(self) -> None:
        """Wait until the fault proxy holds no connection the daemon let go of, and no exchange is in progress
        (a producer still holding a stalled connection never settles: a leaked task)."""

        def settled() -> bool:
            held = self.fds().to_proxy
            return {c.peer_port for c in self.fault.open_connections} <= held and not self.fault.busy_connections

        try:
            await self.fault.wait_until(settled, timeout=SETTLE)
        except trio.TooSlowError:
            busy = [(c.number, [(r.path, r.outcome) for r in c.requests[-1:]]) for c in self.fault.busy_connections]
            pytest.fail(f"connections still busy or not closed after {SETTLE} s: busy={busy}", pytrace=False)

    async def assert_no_leaks(self) -> None:
        await self.settle()
        assert self.baseline is not None, "open() takes the baseline"
        now = self.fds()
        open_ports = {c.peer_port for c in self.fault.open_connections}
        assert now.to_proxy == open_ports, "the daemon holds connections the fault proxy closed"
        assert (now.pipes, now.other) == (self.baseline.pipes, self.baseline.other), (self.baseline, now)

    async def exits_within(self, seconds: float) -> None:
        with trio.fail_after(seconds):
            await self.process.wait()


@asynccontextmanager
async def daemon(fault: FaultProxy, flags: tuple[str, ...] = FLAGS) -> AsyncIterator[Daemon]:
    """Our server on a socketpair, with the client bindings; Shutdown at the end, and the process must exit."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process = await trio.lowlevel.open_process(
            [*DEFAULT_ARGV, *flags], stdin=theirs.fileno(), stdout=subprocess.DEVNULL
        )
    finally:
        theirs.close()
    try:
        async with ImageProxy.connect(ours) as proxy:
            yield Daemon(proxy, process, fault)
        with trio.fail_after(EXIT_BOUND):
            await process.wait()
        assert_transport_used(fault)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


# ----------------------------------------------------------------------------------------------- helpers


def blob_path(layer: Layer) -> str:
    return f"/blobs/{re.escape(layer.digest)}$"


async def fetch_blob(proxy: ImageProxy, image: int, layer: Layer) -> tuple[bytes, ProxyError | None]:
    """GetBlob + FinishPipe: (every byte delivered, FinishPipe's error)."""
    parts: list[bytes] = []
    try:
        await proxy.copy_blob(image, layer.digest, layer.size, parts.append)
    except ProxyError as e:
        return b"".join(parts), e
    return b"".join(parts), None


async def fetch_raw_blob(proxy: ImageProxy, image: int, layer: Layer) -> tuple[bytes, ProxyError | None]:
    """GetRawBlob: (every byte delivered, the error fd's error)."""
    parts: list[bytes] = []
    try:
        await proxy.copy_raw_blob(image, layer.digest, parts.append)
    except ProxyError as e:
        return b"".join(parts), e
    return b"".join(parts), None


def assert_complete(delivered: bytes, error: ProxyError | None, layer: Layer) -> None:
    assert error is None, f"expected the blob, got: {error}"
    assert len(delivered) == layer.size
    assert delivered == layer.data, f"first wrong byte at {_first_difference(delivered, layer.data)}"


def assert_prefix(delivered: bytes, layer: Layer) -> None:
    """A failed transfer delivered a prefix of the blob: nothing twice, nothing skipped, nothing wrong."""
    assert delivered == layer.data[: len(delivered)], f"first wrong byte at {_first_difference(delivered, layer.data)}"


def assert_gave_up(error: ProxyError | None, fault: FaultProxy, offset: int) -> None:
    assert error is not None, "expected a reported failure"
    assert error.code is ErrorCode.RETRYABLE, (error.code, str(error))
    assert f"127.0.0.1:{fault.port}" in str(error), f"the host is not named: {error}"
    assert str(offset) in str(error) or f"{offset:,}" in str(error), f"the offset {offset} is not named: {error}"


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def range_start(record: RequestRecord) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", record.range or "")
    return int(match.group(1)) if match else None


def requests_for(fault: FaultProxy, layer: Layer) -> list[RequestRecord]:
    return fault.requests_for(blob_path(layer))


# ----------------------------------------------------------------------------------------------- the seed case


async def test_seed_stall_at_76_percent_once_completes_after_one_resume(
    fault: FaultProxy, fault_images: FaultImages
) -> None:
    layer = fault_images.seed
    assert layer.size == 2_759_859
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(layer), nth=1)
            started = trio.current_time()
            delivered, error = await fetch_blob(d.proxy, image, layer)
            elapsed = trio.current_time() - started
            assert_complete(delivered, error, layer)
            first, second = requests_for(fault, layer)
            assert first.outcome == "stalled" and first.body_sent == SEED_OFFSET and first.range is None
            assert second.range == f"bytes={SEED_OFFSET}-"
            assert second.status == 206 and second.outcome == "complete"
            assert second.body_sent == layer.size - SEED_OFFSET
            assert second.connection != first.connection  # the stalled connection is never reused
            assert STALL * 0.9 <= elapsed < STALL + 5.0
            await d.assert_no_leaks()
            assert not fault.connection(first.connection).is_open


async def test_seed_stall_forever_fails_finishpipe_within_the_bound_and_keeps_serving(
    fault: FaultProxy, fault_images: FaultImages
) -> None:
    layer = fault_images.seed
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            stall = fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(layer))
            started = trio.current_time()
            delivered, error = await fetch_blob(d.proxy, image, layer)
            finished = trio.current_time()
            assert_gave_up(error, fault, SEED_OFFSET)
            assert delivered == layer.data[:SEED_OFFSET]  # every byte that came, exactly once
            assert finished - started < GIVE_UP_BOUND
            attempts = requests_for(fault, layer)
            assert 2 <= len(attempts) <= 1 + MAX_RESUMES
            assert all(r.range == f"bytes={SEED_OFFSET}-" for r in attempts[1:])
            assert all(r.outcome == "stalled" for r in attempts)
            # each resumed request stalls right after its head: it is given up (the next request, or the
            # report) one stall deadline later, whether the blocked read was plain or inside TLS
            ends = [r.received_at for r in attempts[2:]] + [finished]
            waits = [end - r.received_at for r, end in zip(attempts[1:], ends, strict=True)]
            assert all(STALL * 0.9 <= wait < STALL + STALL_SLACK for wait in waits), waits
            await d.assert_no_leaks()

            # still serving: OpenImage, GetManifest and a second blob (and the first one, once it flows again)
            again = await d.open(fault_images)
            assert again != image
            assert_complete(*await fetch_blob(d.proxy, again, fault_images.small), fault_images.small)
            fault.remove_rule(stall)
            assert_complete(*await fetch_blob(d.proxy, again, layer), layer)
            await d.assert_no_leaks()

            await d.proxy.shutdown()
            await d.exits_within(EXIT_BOUND)
            assert d.process.returncode == 0


# ------------------------------------------------------------------------------------------ every fault, everywhere


POSITIONS = {"start": lambda size: 0, "middle": lambda size: size // 2, "last-byte": lambda size: size - 1}
KINDS: dict[str, Callable[[int], Action]] = {
    "stall": lambda at: Stall(at=at),
    "reset": lambda at: Reset(at=at),
    "close": lambda at: Close(at=at),
    # four bytes 0.3 s apart: 1.2 s in all, longer than the stall deadline, yet never 1 s without a byte
    "drip": lambda at: Drip(at=at, count=4, interval=0.3),
    "flip": lambda at: Flip(at=at),
}


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kind", list(KINDS))
async def test_fault_at_start_middle_and_last_byte(
    fault: FaultProxy, fault_images: FaultImages, kind: str, position: str
) -> None:
    layer = fault_images.seed
    at = POSITIONS[position](layer.size)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            fault.add_rule(KINDS[kind](at), path=blob_path(layer), nth=1)
            delivered, error = await fetch_blob(d.proxy, image, layer)
            attempts = requests_for(fault, layer)
            if kind == "flip":
                # a flipped byte cannot be resumed away: the digest differs at the end
                assert error is not None and "corrupted blob" in str(error), error
                flipped = bytearray(layer.data)
                flipped[at] ^= 0xFF
                assert delivered == bytes(flipped[: len(delivered)])
            elif kind == "drip":
                assert_complete(delivered, error, layer)
                assert len(attempts) == 1, "a slow but moving body is not a stall"
            else:
                assert_complete(delivered, error, layer)
                assert len(attempts) == 2, [(r.range, r.outcome) for r in attempts]
                start = range_start(attempts[1])
                if at == 0:
                    assert attempts[1].range in (None, "bytes=0-")
                elif kind == "reset":  # an RST may discard what the daemon had not read yet
                    assert start is not None and 0 <= start <= at
                else:
                    assert start == at
            await d.assert_no_leaks()


@pytest.mark.parametrize("status", [500, 503, 429])
@pytest.mark.parametrize("when", ["first-request", "resume"])
async def test_error_status_answers(fault: FaultProxy, fault_images: FaultImages, status: int, when: str) -> None:
    layer = fault_images.seed
    retry_after = None if status == 500 else "1"
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            if when == "resume":
                fault.add_rule(Reset(at=layer.size // 2), path=blob_path(layer), nth=1)
                fault.add_rule(Answer(status, retry_after=retry_after), path=blob_path(layer), ranged=True, nth=1)
            else:
                fault.add_rule(Answer(status, retry_after=retry_after), path=blob_path(layer), nth=1)
            assert_complete(*await fetch_blob(d.proxy, image, layer), layer)
            attempts = requests_for(fault, layer)
            answered = next(i for i, r in enumerate(attempts) if r.outcome == "answered")
            if retry_after is not None:  # honoured
                assert attempts[answered + 1].received_at - attempts[answered].received_at >= 0.9
            if when == "resume":
                assert attempts[answered].range is not None
                assert attempts[answered + 1].range == attempts[answered].range
            await d.assert_no_leaks()


async def test_several_faults_in_one_blob(fault: FaultProxy, fault_images: FaultImages) -> None:
    """A stall, a reset and a close more than 1 MiB apart (three resumes: the budget, each after progress),
    then a slow patch that is not a stall."""
    layer = fault_images.long
    mib = 1 << 20
    path = blob_path(layer)
    fault.add_rule(Stall(at=1 * mib + 100), path=path, nth=1)
    fault.add_rule(Reset(at=2 * mib + 300), path=path, nth=2)
    fault.add_rule(Close(at=3 * mib + 500), path=path, nth=3)
    fault.add_rule(Drip(at=4 * mib + 7, count=3, interval=0.3), path=path, nth=4)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            assert_complete(*await fetch_blob(d.proxy, image, layer), layer)
            attempts = requests_for(fault, layer)
            assert [r.outcome for r in attempts] == ["stalled", "reset", "closed", "complete"]
            assert attempts[1].range == f"bytes={1 * mib + 100}-"
            assert attempts[3].range == f"bytes={3 * mib + 500}-"
            await d.assert_no_leaks()


# ----------------------------------------------------------------------------------------------- ranges


async def test_200_to_a_range_request_skips_what_was_delivered(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.seed
    at = layer.size // 3
    fault.add_rule(Close(at=at), path=blob_path(layer), nth=1)
    fault.add_rule(StripRange(), path=blob_path(layer), ranged=True, nth=1)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            assert_complete(*await fetch_blob(d.proxy, image, layer), layer)  # exactly once: no byte twice
            first, second = requests_for(fault, layer)
            assert first.outcome == "closed" and first.range is None
            assert second.range == f"bytes={at}-" and second.status == 200 and second.outcome == "complete"
            await d.assert_no_leaks()


WRONG_RANGES = {
    "start+1": WrongContentRange(start_delta=1),
    "start-1": WrongContentRange(start_delta=-1),
    "total+1": WrongContentRange(total_delta=1),
    "total-unknown": WrongContentRange(value="bytes 0-0/*"),
}


@pytest.mark.parametrize("wrong", list(WRONG_RANGES))
async def test_206_with_a_wrong_content_range_is_refused_once(
    fault: FaultProxy, fault_images: FaultImages, wrong: str
) -> None:
    layer = fault_images.seed
    at = layer.size // 2
    fault.add_rule(Reset(at=at), path=blob_path(layer), nth=1)
    lie = fault.add_rule(WRONG_RANGES[wrong], path=blob_path(layer), ranged=True, nth=1)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            # refused, then resumed again: the right bytes, never the lying answer's
            assert_complete(*await fetch_blob(d.proxy, image, layer), layer)
            attempts = requests_for(fault, layer)
            assert len(attempts) == 3 and lie.fired == [attempts[1]]
            assert attempts[2].range == attempts[1].range
            await d.assert_no_leaks()


async def test_206_with_a_wrong_content_range_every_time_is_reported(
    fault: FaultProxy, fault_images: FaultImages
) -> None:
    layer = fault_images.seed
    at = layer.size // 2
    fault.add_rule(Close(at=at), path=blob_path(layer), nth=1)
    fault.add_rule(WrongContentRange(start_delta=-1), path=blob_path(layer), ranged=True)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            delivered, error = await fetch_blob(d.proxy, image, layer)
            assert_gave_up(error, fault, at)
            assert delivered == layer.data[:at]  # never a byte of the lying answers
            assert 2 <= len(requests_for(fault, layer)) <= 1 + MAX_RESUMES
            await d.assert_no_leaks()


# ----------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    "action",
    [Reset(at=100), Close(at=100), Stall(at=100), Answer(503, retry_after="1")],
    ids=["reset", "close", "stall", "503"],
)
async def test_a_fault_on_a_manifest_fetch(fault: FaultProxy, fault_images: FaultImages, action: Action) -> None:
    fault.add_rule(action, path=r"/test/faults/manifests/", nth=1)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)  # checks the manifest's bytes and digest
            assert len(fault.requests_for(r"/test/faults/manifests/")) >= 2
            assert_complete(*await fetch_blob(d.proxy, image, fault_images.small), fault_images.small)
            await d.assert_no_leaks()


async def test_a_manifest_that_stalls_for_good_is_reported_and_the_daemon_keeps_serving(
    fault: FaultProxy, fault_images: FaultImages
) -> None:
    fault.add_rule(Stall(at=100), path=r"/test/faults/manifests/")
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            single = await d.open(fault_images, "test/single")  # another image on the same registry: fine
            started = trio.current_time()
            with pytest.raises(ProxyError) as caught:
                await d.proxy.open_image(fault_images.ref(fault.port))
            assert trio.current_time() - started < GIVE_UP_BOUND + 5.0  # the retry policy's backoff on top
            assert caught.value.code is ErrorCode.RETRYABLE
            assert f"127.0.0.1:{fault.port}" in str(caught.value)
            layer = fault_images.standard.single.layers[-1]
            assert await d.proxy.get_blob(single, layer.digest, layer.size) == fault_images.standard.single.blob(
                layer.digest
            )
            await d.assert_no_leaks()


# ----------------------------------------------------------------------------------------------- concurrency


async def test_faults_on_two_concurrent_raw_pipes(fault: FaultProxy, fault_images: FaultImages) -> None:
    seed, long = fault_images.seed, fault_images.long
    fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(seed), nth=1)
    fault.add_rule(Reset(at=long.size // 2), path=blob_path(long), nth=1)
    fault.add_rule(Close(at=long.size // 2 + 1000), path=blob_path(long), nth=2)
    results: dict[str, tuple[bytes, ProxyError | None]] = {}
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)

            async def get(name: str, layer: Layer) -> None:
                results[name] = await fetch_raw_blob(d.proxy, image, layer)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, "seed", seed)
                nursery.start_soon(get, "long", long)
            assert_complete(*results["seed"], seed)
            assert_complete(*results["long"], long)
            assert [r.outcome for r in requests_for(fault, seed)] == ["stalled", "complete"]
            assert [r.outcome for r in requests_for(fault, long)] == ["reset", "closed", "complete"]
            await d.assert_no_leaks()


async def test_raw_blob_stalled_for_good_reports_on_the_error_fd(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.seed
    fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(layer))
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            started = trio.current_time()
            delivered, error = await fetch_raw_blob(d.proxy, image, layer)
            assert trio.current_time() - started < GIVE_UP_BOUND
            assert_gave_up(error, fault, SEED_OFFSET)
            assert delivered == layer.data[:SEED_OFFSET]
            await d.assert_no_leaks()


# ----------------------------------------------------------------------------------------------- the client goes away


async def test_client_closes_the_pipe_mid_transfer(fault: FaultProxy, fault_images: FaultImages) -> None:
    """EPIPE is reported, and the registry connection carrying the blob is closed, not reused."""
    layer = fault_images.seed
    # a transfer that keeps moving slowly after 256 KiB: mid-transfer for as long as the test needs
    fault.add_rule(Drip(at=256 << 10, interval=0.05), path=blob_path(layer), nth=1)
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault) as d:
            image = await d.open(fault_images)
            reply, fds = await d.proxy.call("GetBlob", [image, layer.digest, layer.size])
            assert reply.success and len(fds) == 1
            received = bytearray()
            async with trio.lowlevel.FdStream(fds[0]) as stream:
                while len(received) < 64 << 10:
                    received += await stream.receive_some(64 << 10)
            assert_prefix(bytes(received), layer)
            finish, more = await d.proxy.call("FinishPipe", [reply.pipeid])
            assert more == []
            assert not finish.success and finish.error_code is ErrorCode.EPIPE, finish
            record = requests_for(fault, layer)[0]
            connection = fault.connection(record.connection)
            await fault.wait_until(lambda: not connection.is_open, timeout=SETTLE)
            assert connection.closed_by == "client"
            # the next transfer comes on another connection
            assert_complete(*await fetch_blob(d.proxy, image, fault_images.small), fault_images.small)
            assert requests_for(fault, fault_images.small)[-1].connection != record.connection
            await d.assert_no_leaks()


CLIENT_SCRIPT = """\
import json, os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
def call(method, *args):
    s.send(json.dumps({"method": method, "args": list(args)}).encode())
    msg, fds, _, _ = socket.recv_fds(s, 32768, 2)
    return json.loads(msg), fds
call("Initialize")
image = call("OpenImage", sys.argv[2])[0]["value"]
reply, fds = call("GetBlob", image, sys.argv[3], int(sys.argv[4]))
os.set_blocking(fds[0], True)
got = 0
while got < int(sys.argv[5]):  # drain up to the stall, so the producer is waiting for the network
    got += len(os.read(fds[0], 1 << 20))
s.send(json.dumps({"method": "FinishPipe", "args": [reply["pipeid"]]}).encode())
print("reading", flush=True)
sys.stdin.read()
"""


async def test_client_process_dies_mid_transfer(fault: FaultProxy, fault_images: FaultImages, tmp_path: Path) -> None:
    """The client is killed while the producer stalls and FinishPipe waits: the daemon exits within 1 s (it
    runs with the default 30 s stall deadline, so it is not waiting for that)."""
    layer = fault_images.seed
    fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(layer))
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = await trio.lowlevel.open_process(
        [*DEFAULT_ARGV, *LONG_STALL_FLAGS], stdin=theirs.fileno(), stdout=subprocess.DEVNULL
    )
    argv = [sys.executable, str(script), str(ours.fileno()), fault_images.ref(fault.port), layer.digest]
    client = await trio.lowlevel.open_process(
        [*argv, str(layer.size), str(SEED_OFFSET)],
        pass_fds=[ours.fileno()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    ours.close()
    theirs.close()
    try:
        with trio.fail_after(HANG_GUARD):
            assert client.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await client.stdout.receive_some(64)
                assert chunk, "the client script ended early"
                line += chunk
            assert line == b"reading\n"
            await fault.wait_until(lambda: any(r.outcome == "stalled" for r in requests_for(fault, layer)))
        client.kill()
        await client.wait()
        with trio.fail_after(EXIT_BOUND):
            assert await server.wait() == 0
        with trio.fail_after(SETTLE):
            await fault.wait_until(lambda: not fault.open_connections)
        assert all(c.closed_by == "client" for c in fault.connections if c.requests)
        assert_transport_used(fault)
    finally:
        for process in (server, client):
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@pytest.mark.parametrize("how", ["shutdown", "socket-eof"])
async def test_shutdown_or_eof_while_a_producer_stalls_ends_the_daemon_at_once(
    fault: FaultProxy, fault_images: FaultImages, how: str
) -> None:
    layer = fault_images.seed
    fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(layer))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = await trio.lowlevel.open_process(
        [*DEFAULT_ARGV, *LONG_STALL_FLAGS], stdin=theirs.fileno(), stdout=subprocess.DEVNULL
    )
    theirs.close()
    try:
        with trio.fail_after(HANG_GUARD):
            async with ImageProxy.connect(ours) as proxy, trio.open_nursery() as nursery:
                image = await proxy.open_image(fault_images.ref(fault.port))

                async def transfer() -> None:
                    with pytest.raises(ProxyClosed):
                        await proxy.copy_blob(image, layer.digest, layer.size, lambda _: None)

                nursery.start_soon(transfer)
                await fault.wait_until(lambda: any(r.outcome == "stalled" for r in requests_for(fault, layer)))
                if how == "shutdown":
                    await proxy.shutdown()
                else:
                    ours.shutdown(socket.SHUT_RDWR)
                with trio.fail_after(EXIT_BOUND):
                    assert await process.wait() == 0
        with trio.fail_after(SETTLE):
            await fault.wait_until(lambda: not fault.open_connections)
        assert_transport_used(fault)  # over TLS: the blocked read was inside TLS
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
