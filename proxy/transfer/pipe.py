"""A kernel pipe handed to a client, and how its producer's outcome reaches FinishPipe.

A ``Pipe`` is one ``os.pipe()``: the read end travels to the client (SCM_RIGHTS) and is closed here once sent;
the write end stays the server's until FinishPipe (or the session's end). A producer is a task in the session's
nursery that writes into the write end and records its outcome; FinishPipe awaits that outcome without holding
anything else.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Awaitable, Callable

import attrs
import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.common.pipes import open_pipe
from proxy.http.errors import HTTPError

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Pipe:
    """A pipe whose write end the server owns; ``pipeid`` is the write fd number, as in Go. The write end is
    non-blocking; the trio stream over it (``writer``) is made when a producer first needs it: a small reply
    written at once (``write_now``) never needs one."""

    read_fd: int
    pipeid: int
    done: trio.Event = attrs.field(factory=trio.Event)
    error: ProxyError | None = None
    _writer: trio.lowlevel.FdStream | None = None
    _closed: bool = False

    @classmethod
    def create(cls, *, enlarge: bool = True) -> Pipe:
        """A new pipe (``enlarge``: with a large buffer, for a stream); ProxyError (retryable) when the process
        has no fd left for it."""
        try:
            read_fd, write_fd = open_pipe(enlarge=enlarge)
        except OSError as e:
            log.error("cannot create a pipe: %s", e.strerror)
            raise ProxyError(f"cannot create a pipe: {e.strerror}", ErrorCode.RETRYABLE) from None
        try:
            # only the write end: the read end goes to the client, which expects a blocking pipe. A fresh pipe's
            # other status flags are all clear, so one F_SETFL does it.
            fcntl.fcntl(write_fd, fcntl.F_SETFL, os.O_NONBLOCK)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        return cls(read_fd=read_fd, pipeid=write_fd)

    @property
    def writer(self) -> trio.lowlevel.FdStream:
        """The write end as a trio stream (made on first use; it owns the fd from then on)."""
        if self._writer is None:
            if self._closed:  # the fd number may belong to something else by now: never wrap it
                raise ProxyError("write to a pipe that was already closed", ErrorCode.OTHER)
            self._writer = trio.lowlevel.FdStream(self.pipeid)
        return self._writer

    def close_now(self) -> None:
        """Close both ends of a pipe that was never handed out (synchronous)."""
        os.close(self.read_fd)
        self.close()

    def write_now(self, data: bytes) -> int:
        """Write what the pipe takes of ``data`` without waiting: the bytes written (before any producer runs)."""
        assert self._writer is None and not self._closed
        try:
            return os.write(self.pipeid, data)
        except BlockingIOError:
            return 0

    def finish(self, error: ProxyError | None) -> None:
        self.error = error
        self.done.set()

    def close(self) -> None:
        """Close the write end (never waits: the client sees the end of the data once it has read it)."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()  # tells trio first, in case a task waits on the fd
        else:
            os.close(self.pipeid)


def from_http(error: HTTPError) -> ProxyError:
    """An HTTP client error that reached the protocol unconverted (the registry layer names what it was doing
    and converts; this is the safety net): its text, retryable when it says so."""
    return ProxyError(error.message, ErrorCode.RETRYABLE if error.retryable else ErrorCode.OTHER)


async def run_producer(pipe: Pipe, work: Callable[[], Awaitable[None]]) -> None:
    """Run a producer's work and finish the pipe with what FinishPipe is to report: nothing, the ProxyError it
    raised, or an internal error (logged) for anything else."""
    error: ProxyError | None = None
    try:
        await work()
    except ProxyError as e:
        error = e
    except HTTPError as e:
        error = from_http(e)
    except Exception as e:
        log.exception("pipe %d: producer failed", pipe.pipeid)
        error = ProxyError(f"internal error: {type(e).__name__}: {e}")
    finally:
        pipe.finish(error)


__all__ = ["Pipe", "from_http", "run_producer"]
