"""Running tasks side by side where the first failure is what the caller sees: raised as itself, not inside an
ExceptionGroup, with everything else cancelled. Used by the client bindings, the commands and the daemon."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio


def first_exception(group: BaseExceptionGroup) -> Exception | None:
    """The first leaf of ``group`` that is an Exception (not a cancellation)."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found = first_exception(error)
            if found is not None:
                return found
        elif isinstance(error, Exception):
            return error
    return None


@contextlib.asynccontextmanager
async def failing_fast() -> AsyncIterator[trio.Nursery]:
    """A nursery whose first failure, of its body or of a task, cancels the rest and is raised as itself."""
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except Exception as e:
                failure = e
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        first = first_exception(group)
        if first is None:
            raise
        raise first from None
    if failure is not None:
        raise failure


async def run_concurrently(*jobs: Callable[[], Awaitable[Any]]) -> None:
    """Run jobs side by side; the first failure cancels the rest and is raised as itself."""
    async with failing_fast() as nursery:
        for job in jobs:
            nursery.start_soon(job)


__all__ = ["failing_fast", "first_exception", "run_concurrently"]
