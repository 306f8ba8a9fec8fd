"""Worker threads, shared fairly: each client's requests hold at most its own share of them.

File reads, hashing and other blocking calls run in trio's worker threads (at most 40 at once in the process).
Without a share, one client whose requests block in the kernel (a hung NFS mount, a huge layout) could hold all
of them and stall every other client's OpenImage. A session sets its own limiter for everything it runs
(``client_threads``): tasks it starts inherit it, as contextvars do in trio. Work that belongs to the process
(a cache download shared by several clients) runs without one (``no_client_threads``).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import trio

T = TypeVar("T")

_client_limiter: contextvars.ContextVar[trio.CapacityLimiter | None] = contextvars.ContextVar(
    "image_proxy_client_threads", default=None
)


async def run_sync(fn: Callable[..., T], *args: object, abandon_on_cancel: bool = False) -> T:
    """``fn(*args)`` in a worker thread, within the current client's share (trio.to_thread.run_sync otherwise).

    ``abandon_on_cancel``: a cancelled caller returns at once and the thread's result is dropped; only for reads
    (never for writes: an abandoned write could land after its file was closed and its fd reused)."""
    limiter = _client_limiter.get()
    if limiter is None:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
    async with limiter:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)


@contextlib.contextmanager
def client_threads(limit: int) -> Iterator[trio.CapacityLimiter]:
    """Within the block (and in tasks started from it), worker threads count against a share of ``limit``."""
    limiter = trio.CapacityLimiter(max(1, limit))
    token = _client_limiter.set(limiter)
    try:
        yield limiter
    finally:
        _client_limiter.reset(token)


def no_client_threads() -> None:
    """In the current task: worker threads are the process's, not a client's (for work shared by clients)."""
    _client_limiter.set(None)


class WorkAbandoned(Exception):
    """Raised in a worker thread whose caller was cancelled: it stops and releases what it holds."""


# ---- work a cancelled caller leaves behind

_NOTHING: Any = object()


class CancelFlag:
    """Set when the trio caller of a worker thread is cancelled; the thread polls it (``check``)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._delivered: Any = _NOTHING

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise WorkAbandoned

    def _deliver(self, result: Any) -> bool:
        """In the thread, its result ready: False when the caller is gone (the thread must release it)."""
        with self._lock:
            if self._event.is_set():
                return False
            self._delivered = result
            return True

    def _abandon(self) -> Any:
        """In trio, the caller leaving: set the flag; the result the thread delivered meanwhile, if any."""
        with self._lock:
            self._event.set()
            result, self._delivered = self._delivered, _NOTHING
            return result


async def run_cancellable(fn: Callable[[CancelFlag], T], release: Callable[[T], None]) -> T:
    """``fn(flag)`` in a worker thread (within the client's share). Cancelling the caller sets ``flag`` and returns
    at once; the thread stops at its next ``flag.check()``. Whatever it produced is ``release``d exactly once
    when the caller is gone, whether it finished before or after.

    Abandoning is safe here although the thread may write: it writes only to a temporary file it opened itself
    and closes itself, never to an fd the caller could close and the process reuse."""
    flag = CancelFlag()

    def work() -> T:
        result = fn(flag)
        if not flag._deliver(result):
            release(result)
            raise WorkAbandoned
        return result

    try:
        return await run_sync(work, abandon_on_cancel=True)
    except BaseException:
        left = flag._abandon()
        if left is not _NOTHING:
            release(left)
        raise


__all__ = ["CancelFlag", "WorkAbandoned", "client_threads", "no_client_threads", "run_cancellable", "run_sync"]
