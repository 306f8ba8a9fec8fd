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
from collections.abc import Callable, Iterator
from typing import TypeVar

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


__all__ = ["client_threads", "no_client_threads", "run_sync"]
