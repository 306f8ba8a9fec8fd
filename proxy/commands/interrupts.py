"""Ctrl-C and SIGTERM in the commands, as a Unix tool ends: the work is cancelled (temporary files removed, the
proxy's transfers ended, the blob cache keeping its partial files for the next pull), one line says so, and the
exit status is 128 + the signal (130, 143). A second signal while that cleanup runs ends the process at once."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from protocol.client.tasks import failing_fast

T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The command was ended by ``signum``; its work was cancelled and cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


async def _interruptible(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    received: list[int] = []
    work = trio.CancelScope()  # the command's work; the watcher stays outside it, for a second signal
    with trio.open_signal_receiver(*SIGNALS) as signals:
        try:
            async with failing_fast() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        if received:  # a second one: the cleanup is taking too long for someone
                            print(f"image-proxy: {signal.Signals(signum).name} again, exiting", file=sys.stderr)
                            os._exit(128 + signum)
                        received.append(signum)
                        work.cancel()

                nursery.start_soon(watch)
                with work:
                    result = await fn(*args)
                nursery.cancel_scope.cancel()
        except Exception:
            if received:  # what the cancellation made of the work (a ProxyError, an OSError) is not the news
                raise Interrupted(received[0]) from None
            raise
    if received:
        raise Interrupted(received[0])
    return result


def run_interruptible(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """``trio.run(fn, *args)``; SIGINT or SIGTERM cancels ``fn`` and raises :class:`Interrupted` once it has
    cleaned up."""
    return trio.run(_interruptible, fn, *args)


__all__ = ["Interrupted", "run_interruptible"]
