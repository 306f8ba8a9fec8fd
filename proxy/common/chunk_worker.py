"""A dedicated thread that does blocking work on a stream's chunks (hash them, write them to a file) while the
trio task that produced them goes on reading the next ones.

Per chunk, ``hashlib`` and ``os.pwrite`` release the GIL, so hashing and writing overlap the network read and
the pipe write instead of following them. Chunks are done in the order given; at most ``depth`` are queued or
in progress (so memory stays bounded and a slow disk slows the stream instead of filling memory). When a chunk
is done, ``on_done(chunk)`` runs in the trio thread (no locks: every state change happens there).

``inline=True`` does each chunk's work in ``submit`` itself, without a thread: for blobs too small for a thread's
round trip to pay.

The thread is a task of the worker's own nursery, with a limiter of its own: it never takes one of the shared
worker threads, so a stream whose client reads slowly (the thread then idles) holds nobody else's resource. On
leaving the block normally, every chunk is done (``drain``); on an error or a cancellation, chunks not yet
started are dropped and the block waits only for the one in progress (never a network wait).
"""

from __future__ import annotations

import contextlib
import functools
import queue
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

import trio

C = TypeVar("C")

#: chunks queued or in progress at most, by default
DEFAULT_DEPTH = 4

_STOP = object()


class ChunkWorker(Generic[C]):
    """Feed it with :meth:`submit`; :meth:`drain` waits until every chunk is done. Use :func:`chunk_worker`."""

    def __init__(
        self, work: Callable[[C], None], depth: int, on_done: Callable[[C], None] | None, *, inline: bool = False
    ) -> None:
        self._work = work
        self._on_done = on_done
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots = trio.Semaphore(depth)
        self._token = trio.lowlevel.current_trio_token()
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._discard = False  # set from trio: the thread drops what it has not started
        self._inline = inline

    async def submit(self, chunk: C, *, small: bool = False) -> None:
        """Queue ``chunk``; waits only while ``depth`` chunks are pending. Raises what the work raised.

        ``small``: the chunk is worked on here when nothing is pending (so the order holds), as a thread's round
        trip would cost more than the work."""
        self._raise_error()
        if self._inline or (small and not self._pending):
            await trio.lowlevel.checkpoint()
            self._work(chunk)
            if self._on_done is not None:
                self._on_done(chunk)
            return
        await self._slots.acquire()
        self._raise_error()
        self._pending += 1
        self._idle = trio.Event()
        self._queue.put(chunk)

    async def drain(self) -> None:
        """Wait until every submitted chunk is done; raises what the work raised."""
        await self._idle.wait()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- in the thread ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while (chunk := self._queue.get()) is not _STOP:
            error: BaseException | None = None
            if not self._discard:
                try:
                    self._work(chunk)  # type: ignore[arg-type]
                except BaseException as e:  # handed to the trio side, which raises it
                    error = e
            self._token.run_sync_soon(self._finished, chunk, error)

    # -- back in trio -----------------------------------------------------------------------------------------

    def _finished(self, chunk: C, error: BaseException | None) -> None:
        self._pending -= 1
        self._slots.release()
        if error is not None and self._error is None:
            self._error = error
            self._discard = True
        elif error is None and not self._discard and self._on_done is not None:
            try:
                self._on_done(chunk)
            except Exception as e:  # never into trio's run loop: the submitter raises it
                self._error = e
                self._discard = True
        if self._pending == 0:
            self._idle.set()


@contextlib.asynccontextmanager
async def chunk_worker(
    work: Callable[[C], None],
    *,
    depth: int = DEFAULT_DEPTH,
    on_done: Callable[[C], None] | None = None,
    inline: bool = False,
) -> AsyncIterator[ChunkWorker[C]]:
    """A :class:`ChunkWorker` and its thread (none when ``inline``) for the duration of the block."""
    worker: ChunkWorker[C] = ChunkWorker(work, max(1, depth), on_done, inline=inline)
    if inline:
        yield worker
        return
    run_thread = functools.partial(trio.to_thread.run_sync, worker._loop, limiter=trio.CapacityLimiter(1))
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_thread)
        try:
            yield worker
            await worker.drain()
        except BaseException as e:
            # raised again below, as itself: the nursery would wrap it in an ExceptionGroup
            worker._discard = True
            error = e
        finally:
            worker._queue.put(_STOP)
    if error is not None:
        raise error


__all__ = ["DEFAULT_DEPTH", "ChunkWorker", "chunk_worker"]
