"""The blob cache (--blob-cache) under crashes and pressure, against the real registry behind the fault proxy.

- SIGKILL at random points of a multi-layer pull, over and over: no file under a final digest name is ever
  corrupt, every partial is a prefix of its blob, each new daemon resumes exactly where the partial ends, and
  in all no blob's bytes come from the network twice beyond what each kill could lose (the daemon's unwritten
  chunk). The transfers are slowed with ``Drip`` windows at random offsets, so the kills land mid-blob; the
  kill happens when the fault proxy has forwarded a random number of drip bytes (waiting on its counters and
  on the bytes the client received, never on time). ``BLOB_CACHE_CRASH_SEED`` reproduces a run.
- ``--blob-cache-max`` eviction while a cached blob is being read: it is skipped while read, evicted by the
  next pass after the read ended.
- A read-only cache (a read-only bind mount in a private mount namespace): served from, never written to.

These run over plain HTTP only (``TRANSPORTS``; see conftest.py): what they test, the cache files under SIGKILL,
eviction and a read-only mount, does not depend on the transport, and pulls and resumes through the cache over TLS
are test_blob_cache.py's ``[tls-...]`` cases; over TLS as well they would add some 15 s to tests/faults.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from protocol.client import DEFAULT_ARGV, ImageProxy
from protocol.errors import ProxyError
from proxy.common.pipes import CHUNK_SIZE, PIPE_SIZE
from tests.faults.conftest import FaultImages, Layer
from tests.faults.proxy import Drip, FaultProxy, RequestRecord
from tests.faults.transport import assert_transport_used

#: the fault proxy speaks plain HTTP only here (see the module docstring)
TRANSPORTS = ("plain",)
#: set it to a run's printed seed to replay that run's kill points
SEED_ENV = "BLOB_CACHE_CRASH_SEED"
#: SIGKILLs in the crash loop (then one more pull that must complete)
KILLS = 24
#: the drip windows: one byte per DRIP_INTERVAL, DRIP_COUNT bytes (a kill lands within its first bytes)
DRIP_INTERVAL = 0.001
DRIP_COUNT = 4000
#: a kill waits for 1..MAX_DRIP_BEFORE_KILL dripped bytes of each slowed layer
MAX_DRIP_BEFORE_KILL = 64
#: hang guards only
ITERATION_GUARD = 20.0
HANG_GUARD = 60.0
#: how long a daemon may take to exit after Shutdown before it is killed
EXIT_WAIT = 5.0


# ------------------------------------------------------------------------------------------------ helpers


def cache_args(cache: Path, *extra: str) -> list[str]:
    return ["--tls-verify=false", "--blob-cache", str(cache), *extra]


def final(cache: Path, layer: Layer) -> Path:
    return cache / "blobs" / "sha256" / layer.digest.split(":")[1]


def partial(cache: Path, layer: Layer) -> Path:
    path = final(cache, layer)
    return path.with_name(path.name + ".partial")


def blob_gets(fault: FaultProxy, layer: Layer) -> list[RequestRecord]:
    return fault.requests_for(f"/blobs/{layer.digest}$")


def partial_size(cache: Path, layer: Layer) -> int:
    try:
        return partial(cache, layer).stat().st_size
    except FileNotFoundError:
        return 0


def cache_state(cache: Path, layer: Layer) -> int | None:
    """None when the blob is stored under its final name, else the size of its partial (0: none)."""
    if final(cache, layer).exists():
        return None
    try:
        return partial(cache, layer).stat().st_size
    except FileNotFoundError:
        return 0


def check_cache_files(cache: Path, layers: Sequence[Layer], context: str) -> None:
    """Every final name holds exactly its blob; every partial is a prefix of its blob; nothing else."""
    by_hex = {layer.digest.split(":")[1]: layer for layer in layers}
    directory = cache / "blobs" / "sha256"
    if not directory.exists():
        return
    for path in directory.iterdir():
        data = path.read_bytes()
        if path.name.endswith(".partial"):
            layer = by_hex.get(path.name.removesuffix(".partial"))
            assert layer is not None, f"{context}: unexpected partial {path.name}"
            assert len(data) <= layer.size and layer.data[: len(data)] == data, (
                f"{context}: {path.name} ({len(data)} bytes) is not a prefix of its blob"
            )
        else:
            assert path.name in by_hex, f"{context}: unexpected file {path.name}"
            assert hashlib.sha256(data).hexdigest() == path.name, f"{context}: {path.name} is corrupt"


class Changes:
    """Wakes waiters on every change the test reports (bytes received, stderr, fault proxy progress)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Return once ``predicate()`` holds; ``timeout`` is a hang guard."""
        try:
            with trio.fail_after(timeout):
                while not predicate():
                    await self._event.wait()
        except trio.TooSlowError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def relay(fault: FaultProxy, changes: Changes) -> None:
    """Forward the fault proxy's changes (requests, body bytes forwarded) to ``changes``."""

    def mark() -> tuple[int, int]:
        return fault.counters.requests, fault.counters.body_bytes_to_client

    seen = mark()

    def moved() -> bool:
        return mark() != seen

    while True:
        await fault.wait_until(moved, timeout=math.inf)
        seen = mark()
        changes.notify()


@attrs.define(eq=False)
class StderrLog:
    """A daemon's stderr, collected as it comes."""

    changes: Changes
    data: bytearray = attrs.field(factory=bytearray)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while chunk := await stream.receive_some(65536):
                self.data += chunk
                self.changes.notify()


@asynccontextmanager
async def running_daemon(
    args: Sequence[str], log: StderrLog, prefix: Sequence[str] = ()
) -> AsyncIterator[tuple[trio.Process, ImageProxy]]:
    """Our daemon on a socketpair (its pid known, its stderr collected), optionally started through
    ``prefix`` (a command that ends by exec'ing the rest of its arguments)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process = await trio.lowlevel.open_process(
            [*prefix, *DEFAULT_ARGV, *args], stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    finally:
        theirs.close()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(log.collect, process.stderr)
            async with ImageProxy.connect(ours) as proxy:
                yield process, proxy
            with trio.move_on_after(EXIT_WAIT):
                await process.wait()
            if process.returncode is None:
                process.kill()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@attrs.define(eq=False)
class Transfer:
    """One GetBlob as the client sees it."""

    layer: Layer
    received: bytearray = attrs.field(factory=bytearray)
    error: ProxyError | None = None
    finished: bool = False


async def start_get_blob(proxy: ImageProxy, image: int, layer: Layer) -> tuple[int, int]:
    """Send GetBlob; its pipe's read fd and pipeid (nothing is read yet)."""
    reply, fds = await proxy.call("GetBlob", [image, layer.digest, layer.size])
    assert reply.success, f"GetBlob {layer.digest}: {reply.error}"
    assert len(fds) == 1
    return fds[0], reply.pipeid


async def drain(fd: int, transfer: Transfer, changes: Changes) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(1 << 20):
            transfer.received += chunk
            changes.notify()


async def finish(proxy: ImageProxy, fd: int, pipeid: int, transfer: Transfer, changes: Changes) -> None:
    """Drain the pipe while FinishPipe runs; record FinishPipe's error."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, fd, transfer, changes)
        try:
            await proxy.finish_pipe(pipeid)
        except ProxyError as e:
            transfer.error = e
    transfer.finished = True
    changes.notify()


def forwarded_to(fault: FaultProxy, layer: Layer, since: int) -> int:
    """The furthest resource offset the fault proxy forwarded for ``layer`` in requests numbered > ``since``."""
    return max(
        (r.start + r.body_sent for r in blob_gets(fault, layer) if r.number > since),
        default=0,
    )


# ------------------------------------------------------------------------------------------------ kills


@attrs.define
class KillPlan:
    """What one iteration waits for before the kill, per layer: (description, predicate)."""

    conditions: list[tuple[str, Callable[[], bool]]] = attrs.field(factory=list)

    def ready(self) -> bool:
        return all(predicate() for _, predicate in self.conditions)

    def describe(self) -> str:
        return "; ".join(f"{what}: {'yes' if predicate() else 'no'}" for what, predicate in self.conditions)


def expected_ranges(state: int | None, layer: Layer) -> list[str | None]:
    """The requests a daemon started with the cache in ``state`` makes for ``layer``: none when the blob is
    stored or its partial complete (committed without the network), else one, resumed from the partial."""
    if state is None or state == layer.size:
        return []
    return [None if state == 0 else f"bytes={state}-"]


async def test_sigkill_at_random_points_never_corrupts_and_the_next_pull_resumes(
    fault_images: FaultImages, fault: FaultProxy, tmp_path: Path
) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))
    print(f"{SEED_ENV}={seed}")
    rnd = random.Random(seed)
    tag = f"[{SEED_ENV}={seed}]"
    cache = tmp_path / "cache"
    layers = [fault_images.seed, fault_images.long, fault_images.small]
    # The iteration from which each layer goes through at full speed (and may be stored); before it, every
    # iteration drips it from a random offset past its partial. `long` only completes in the last pull.
    complete_at = {layer.digest: rnd.randint(KILLS // 2, KILLS) for layer in layers}
    complete_at[fault_images.long.digest] = KILLS
    changes = Changes()
    kills = 0

    async with trio.open_nursery() as relays:
        relays.start_soon(relay, fault, changes)
        for n in range(KILLS):
            context = f"{tag} kill {n + 1}"
            states = {layer.digest: cache_state(cache, layer) for layer in layers}
            base = len(fault.requests)
            fault.clear_rules()
            transfers = {layer.digest: Transfer(layer) for layer in layers}
            plan = KillPlan()
            for layer in layers:
                state = states[layer.digest]
                transfer = transfers[layer.digest]
                if state is None or state == layer.size:
                    continue  # served from the cache (or committed without the network): any time is a kill point
                if n >= complete_at[layer.digest]:

                    def whole(transfer: Transfer = transfer) -> bool:
                        return len(transfer.received) == transfer.layer.size

                    plan.conditions.append((f"{layer.digest[:19]} whole", whole))
                    continue
                remaining = layer.size - state
                at = min(state + rnd.randint(0, 2 * remaining // (complete_at[layer.digest] - n + 1)), layer.size - 1)
                threshold = at + rnd.randint(1, min(MAX_DRIP_BEFORE_KILL, layer.size - at))
                fault.add_rule(Drip(at=at, count=DRIP_COUNT, interval=DRIP_INTERVAL), path=f"/blobs/{layer.digest}$")

                # Half the time the kill also waits until the fast part before the window is written (a download
                # from zero: the client got it; a resumed one: the partial holds it, and the client gets nothing
                # before the whole blob is verified); else it may land while the daemon holds an unwritten chunk.
                written = at if rnd.random() < 0.5 else 0

                def dripped(
                    layer: Layer = layer,
                    transfer: Transfer = transfer,
                    written: int = written,
                    threshold: int = threshold,
                    base: int = base,
                    resumed: bool = state > 0,
                ) -> bool:
                    have = partial_size(cache, layer) if resumed else len(transfer.received)
                    return have >= written and forwarded_to(fault, layer, base) >= threshold

                plan.conditions.append((f"{layer.digest[:19]} drip {at}..{threshold} written {written}", dripped))
            order = list(layers)
            rnd.shuffle(order)
            log = StderrLog(changes)
            try:
                with trio.fail_after(ITERATION_GUARD):
                    async with running_daemon(cache_args(cache), log) as (process, proxy):
                        image = await proxy.open_image(fault_images.ref(fault.port))
                        async with trio.open_nursery() as nursery:
                            for layer in order:
                                fd, _ = await start_get_blob(proxy, image, layer)
                                nursery.start_soon(drain, fd, transfers[layer.digest], changes)
                            await changes.wait_until(plan.ready, ITERATION_GUARD / 2, "the kill point")
                            process.kill()  # SIGKILL; the pipes and the socket then end
                        await process.wait()
            except (AssertionError, ProxyError, trio.TooSlowError) as e:
                raise AssertionError(
                    f"{context}: {type(e).__name__}: {e}\nplan: {plan.describe()}\ndaemon stderr:\n{log.text}"
                ) from e
            assert process.returncode == -signal.SIGKILL, f"{context}: the daemon exited ({process.returncode}) early"
            kills += 1
            assert "Traceback" not in log.text, f"{context}: {log.text}"
            check_cache_files(cache, layers, context)
            for layer in layers:
                got = [r.range for r in blob_gets(fault, layer) if r.number > base]
                want = expected_ranges(states[layer.digest], layer)
                assert got == want, f"{context}: {layer.digest}: requests {got}, partial state {states[layer.digest]}"
                data = bytes(transfers[layer.digest].received)
                assert layer.data.startswith(data), f"{context}: wrong bytes served for {layer.digest}"
                if states[layer.digest] and n < complete_at[layer.digest]:
                    assert data == b"", f"{context}: resumed bytes of {layer.digest} served before it was verified"
        relays.cancel_scope.cancel()

    # One last pull completes, resuming from the partials.
    fault.clear_rules()
    states = {layer.digest: cache_state(cache, layer) for layer in layers}
    base = len(fault.requests)
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(cache)) as proxy:
            image = await proxy.open_image(fault_images.ref(fault.port))
            for layer in layers:
                assert await proxy.get_blob(image, layer.digest, layer.size) == layer.data, f"{tag} last pull"
    resumed = []
    for layer in layers:
        got = [r.range for r in blob_gets(fault, layer) if r.number > base]
        assert got == expected_ranges(states[layer.digest], layer), f"{tag} last pull: {layer.digest}: {got}"
        resumed += [r for r in got if r is not None]
        assert final(cache, layer).read_bytes() == layer.data and not partial(cache, layer).exists()
    assert resumed, f"{tag} the last pull resumed nothing (partials: {states})"
    check_cache_files(cache, layers, f"{tag} after the last pull")

    # No blob's bytes came twice from the network beyond one unwritten chunk per kill.
    bound = kills * CHUNK_SIZE
    for layer in layers:
        sent = sum(r.body_sent for r in blob_gets(fault, layer))
        waste = sent - layer.size
        print(f"{layer.digest}: {layer.size} bytes, {sent} forwarded in {len(blob_gets(fault, layer))} requests")
        assert 0 <= waste <= bound, f"{tag} {layer.digest}: {waste} bytes downloaded twice (bound {bound})"
    assert kills >= 20
    assert_transport_used(fault)


# ------------------------------------------------------------------------------------------------ eviction


async def test_a_blob_being_read_is_not_evicted_until_its_read_ends(
    fault_images: FaultImages, fault: FaultProxy, tmp_path: Path
) -> None:
    """The cache holds `long` and `small`; a daemon serves `long` from it to a client that does not read yet,
    and meanwhile stores `seed`, which takes the cache over its limit: that pass skips `long` (being read).
    Once the read ended, caching a third blob evicts `long`, the least recently used."""
    long, seed, small = fault_images.long, fault_images.seed, fault_images.small
    # `long` cannot sit whole in the pipe: its producer keeps the cached file open until the client reads
    assert long.size > PIPE_SIZE
    limit = 6 << 20
    assert long.size + small.size <= limit < long.size + seed.size
    cache = tmp_path / "cache"
    args = cache_args(cache, "--blob-cache-max", str(limit), "--debug")
    ref = fault_images.ref(fault.port)
    changes = Changes()

    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=args) as proxy:
            image = await proxy.open_image(ref)
            for layer in (long, small):
                assert await proxy.get_blob(image, layer.digest, layer.size) == layer.data
        assert final(cache, long).exists() and final(cache, small).exists()
        # LRU order for the pass to come: `long` (opened below) < `seed` (stored below) < `small` (used "later").
        # So the pass considers `long` first and ends by evicting `seed` or `small`: its log line marks the end.
        st = final(cache, small).stat()
        os.utime(final(cache, small), ns=(time.time_ns() + 3600 * 10**9, st.st_mtime_ns))

        log = StderrLog(changes)
        async with running_daemon(args, log) as (_, proxy):
            image = await proxy.open_image(ref)
            long_fd, long_pipe = await start_get_blob(proxy, image, long)
            assert len(blob_gets(fault, long)) == 1, "long is served from the cache"
            seed_fd, seed_pipe = await start_get_blob(proxy, image, seed)
            # Neither pipe is read: the seed download completes into the cache, and the eviction pass runs. Its
            # first eviction is whatever it removes first: never `long`, the least recently used but being read.
            evicted = re.compile(r"evicting (sha256:[0-9a-f]{64})")
            await changes.wait_until(lambda: evicted.search(log.text) is not None, HANG_GUARD / 2, "an eviction")
            first = evicted.search(log.text)
            assert first is not None and first.group(1) != long.digest, "a blob being read was evicted"
            assert first.group(1) in (seed.digest, small.digest), first.group(1)
            assert final(cache, long).exists()
            # Now read both to the end.
            long_read, seed_read = Transfer(long), Transfer(seed)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish, proxy, long_fd, long_pipe, long_read, changes)
                nursery.start_soon(finish, proxy, seed_fd, seed_pipe, seed_read, changes)
            for transfer in (long_read, seed_read):
                assert transfer.error is None, transfer.error
                assert bytes(transfer.received) == transfer.layer.data
            assert final(cache, long).exists(), "no pass ran since: long is still there"
            assert f"evicting {long.digest}" not in log.text
            check_cache_files(cache, (long, seed, small), "after the read")

            # A third blob (the one evicted above) is stored: this pass evicts `long`, no longer read.
            third = seed if not final(cache, seed).exists() else small
            assert await proxy.get_blob(image, third.digest, third.size) == third.data
            await changes.wait_until(
                lambda: f"evicting {long.digest}" in log.text, HANG_GUARD / 2, "the eviction of the blob read before"
            )
        assert not final(cache, long).exists()
        assert final(cache, seed).exists() and final(cache, small).exists()
        check_cache_files(cache, (long, seed, small), "after the third blob")
        total = sum(p.stat().st_size for p in (cache / "blobs" / "sha256").iterdir())
        assert total <= limit
    assert_transport_used(fault)


# ------------------------------------------------------------------------------------------------ read-only


def read_only_prefix(source: Path, target: Path) -> list[str]:
    """A command prefix: in a private mount namespace, bind ``source`` read-only onto ``target``, then exec."""
    script = 'src=$1; dst=$2; shift 2; mount --bind -o ro "$src" "$dst" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(source), str(target)]


async def read_only_bind_unavailable(tmp_path: Path) -> str | None:
    """Why a read-only bind mount in a private mount namespace cannot be made here (None: it can)."""
    source, target = tmp_path / "probe-source", tmp_path / "probe-target"
    source.mkdir()
    target.mkdir()
    probe = [*read_only_prefix(source, target), "sh", "-c", f'! touch "{target}/x" 2>/dev/null']
    try:
        result = await trio.run_process(probe, check=False, capture_stdout=True, capture_stderr=True)
    except OSError as e:
        return f"cannot run unshare: {e}"
    if result.returncode != 0:
        return f"no read-only bind mount in a private mount namespace: {result.stderr.decode(errors='replace')}"
    return None


async def test_a_read_only_cache_serves_what_it_holds_and_stores_nothing(
    fault_images: FaultImages, fault: FaultProxy, tmp_path: Path
) -> None:
    why = await read_only_bind_unavailable(tmp_path)
    if why is not None:  # the test needs root and util-linux's unshare (as CI has): never a silent skip
        pytest.fail(f"cannot test a read-only cache here: {why}", pytrace=False)
    small, seed = fault_images.small, fault_images.seed
    source, target = tmp_path / "cache", tmp_path / "read-only"
    target.mkdir()
    ref = fault_images.ref(fault.port)
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(source)) as proxy:
            image = await proxy.open_image(ref)
            assert await proxy.get_blob(image, small.digest, small.size) == small.data
        before = sorted((p.relative_to(source), p.read_bytes()) for p in source.rglob("*") if p.is_file())

        log = StderrLog(Changes())
        async with running_daemon(cache_args(target), log, prefix=read_only_prefix(source, target)) as (_, proxy):
            image = await proxy.open_image(ref)
            assert await proxy.get_blob(image, small.digest, small.size) == small.data
            assert await proxy.get_blob(image, seed.digest, seed.size) == seed.data

    assert len(blob_gets(fault, small)) == 1, "the cached blob was served from the read-only cache"
    assert [g.range for g in blob_gets(fault, seed)] == [None], "the other blob was streamed, in one request"
    after = sorted((p.relative_to(source), p.read_bytes()) for p in source.rglob("*") if p.is_file())
    assert after == before, "nothing was written to the read-only cache"
    assert list(target.iterdir()) == [], "the bind mount stayed in the daemon's namespace"
    said = re.findall(rf"blob cache {re.escape(str(target))} is read-only", log.text)
    assert len(said) == 1, log.text
    assert_transport_used(fault)
