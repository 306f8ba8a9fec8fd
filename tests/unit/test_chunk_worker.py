"""The chunk worker (work beside a stream, in a dedicated thread) and the pump built on it."""

from __future__ import annotations

import hashlib
import threading

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.common.chunk_worker import chunk_worker
from proxy.sources.base import Blob, BytesBlob
from proxy.transfer.pump import INLINE_MAX, pump


async def test_work_is_done_in_order_in_another_thread_and_on_done_runs_in_trio() -> None:
    seen: list[int] = []
    threads: set[int] = set()
    done: list[int] = []
    trio_thread = threading.get_ident()

    def work(n: int) -> None:
        threads.add(threading.get_ident())
        seen.append(n)

    def on_done(n: int) -> None:
        assert threading.get_ident() == trio_thread
        done.append(n)

    async with chunk_worker(work, depth=3, on_done=on_done) as worker:
        for n in range(50):
            await worker.submit(n)
    assert seen == list(range(50)) and done == list(range(50))
    assert trio_thread not in threads


async def test_at_most_depth_chunks_are_pending() -> None:
    release = threading.Event()
    started = threading.Event()

    def work(n: int) -> None:
        started.set()
        release.wait(10)

    async with chunk_worker(work, depth=2) as worker:
        await worker.submit(1)
        await worker.submit(2)
        with trio.move_on_after(0.2) as scope:
            await worker.submit(3)  # the worker holds 2: this one waits
        assert scope.cancelled_caught
        release.set()
        with trio.fail_after(10):
            await worker.submit(3)


async def test_an_error_in_the_work_is_raised_to_the_submitter_and_later_chunks_are_dropped() -> None:
    seen: list[int] = []

    def work(n: int) -> None:
        if n == 3:
            raise OSError(28, "No space left on device")
        seen.append(n)

    with pytest.raises(OSError, match="No space left"):
        async with chunk_worker(work, depth=1) as worker:
            for n in range(10):
                await worker.submit(n)
    assert seen == [0, 1, 2]


async def test_a_cancelled_block_drops_what_was_not_started_and_waits_for_the_chunk_in_progress() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def work(n: int) -> None:
        gate.wait(10)
        seen.append(n)

    with trio.move_on_after(0.2) as scope:
        async with chunk_worker(work, depth=4) as worker:
            for n in range(4):
                await worker.submit(n)
            try:
                await trio.sleep_forever()
            finally:
                gate.set()
    assert scope.cancelled_caught
    # chunk 0 was in progress: the block waited for it. Of the three queued, at most the one the thread took
    # before the block marked the rest dropped was worked on.
    assert seen[:1] == [0] and len(seen) <= 2


class ChoppyBlob(Blob):
    """A stream that returns at most ``step`` bytes per read, to exercise partial buffers."""

    def __init__(self, data: bytes, step: int, size: int | None = None) -> None:
        self._data = data
        self._pos = 0
        self._step = step
        self.size = len(data) if size is None else size

    async def read(self, max_bytes: int) -> bytes:
        n = min(max_bytes, self._step)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        await trio.lowlevel.checkpoint()
        return chunk

    async def aclose(self) -> None:
        pass


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 3 << 20),
    step=st.integers(1, 2 << 20),
    declared=st.sampled_from(["exact", "unknown", "small"]),
)
def test_pump_delivers_every_byte_once_in_order(size: int, step: int, declared: str) -> None:
    step = max(step, size // 2000 + 1)  # bounded: at most some 2000 reads per example
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    size_hint = {"exact": None, "unknown": -1, "small": min(size, 100)}[declared]

    async def main() -> tuple[bytes, str, int]:
        delivered = bytearray()
        hasher = hashlib.sha256()

        async def deliver(chunk: memoryview) -> None:
            delivered.extend(chunk)

        total = await pump(ChoppyBlob(data, step, size_hint), hasher.update, deliver=deliver)
        return bytes(delivered), hasher.hexdigest(), total

    delivered, digest, total = trio.run(main)
    assert delivered == data and total == size
    assert digest == hashlib.sha256(data).hexdigest()


async def test_pump_holds_at_most_depth_plus_one_buffers() -> None:
    buffers: set[int] = set()
    data = bytes(range(256)) * (40 << 12)  # 40 MiB

    def work(chunk: memoryview) -> None:
        buffers.add(id(chunk.obj))

    await pump(ChoppyBlob(data, 1 << 20), work, depth=3)
    assert 1 <= len(buffers) <= 4


async def test_pump_works_small_blobs_inline_and_accept_can_stop_it() -> None:
    worker_threads: set[int] = set()

    def work(chunk: memoryview) -> None:
        worker_threads.add(threading.get_ident())

    await pump(BytesBlob(b"x" * INLINE_MAX), work)
    assert worker_threads == {threading.get_ident()}

    class Stop(Exception):
        pass

    def accept(chunk: memoryview) -> None:
        raise Stop

    with pytest.raises(Stop):
        await pump(ChoppyBlob(b"y" * (4 << 20), 1 << 20), work, accept=accept)


async def test_a_small_chunk_is_worked_on_here_only_when_nothing_is_pending() -> None:
    where: list[tuple[str, bool]] = []
    gate = threading.Event()
    trio_thread = threading.get_ident()

    def work(name: str) -> None:
        if name == "big":
            gate.wait(10)
        where.append((name, threading.get_ident() == trio_thread))

    async with chunk_worker(work, depth=4) as worker:
        await worker.submit("small-first", small=True)  # nothing pending: here
        await worker.submit("big")  # the thread, held at the gate
        await worker.submit("small-after", small=True)  # behind "big": queued, so the order holds
        gate.set()
    assert where == [("small-first", True), ("big", False), ("small-after", False)]
