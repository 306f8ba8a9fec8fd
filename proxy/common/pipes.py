"""Writing into the kernel pipes handed to clients: pipes with a large buffer, writes that turn a reader's close
into the EPIPE error clients expect, and ``sendfile`` from a file into a pipe. Every wait is cancellable; none
has a deadline (a slow reader is allowed, and holds only its own transfer)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable

import trio

from protocol.errors import BROKEN_PIPE_TEXT, ErrorCode, ProxyError
from proxy.common import threads
from proxy.common.page_cache import DropBehind

#: bytes moved per read from a source
CHUNK_SIZE = 1 << 20
#: the largest pipe buffer we ask for; the system limit (/proc/sys/fs/pipe-max-size) may lower it
PIPE_SIZE_CAP = 4 << 20


def _system_pipe_max(path: str = "/proc/sys/fs/pipe-max-size") -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20


#: pipe buffer we ask the kernel for: as large as the system allows, up to PIPE_SIZE_CAP
PIPE_SIZE = min(PIPE_SIZE_CAP, _system_pipe_max())


#: what a new pipe holds without being enlarged (Linux: 16 pages); a write of up to this into an empty pipe
#: takes it whole
PIPE_DEFAULT_SIZE = 64 << 10


def open_pipe(*, enlarge: bool = True) -> tuple[int, int]:
    """A close-on-exec pipe: (read_fd, write_fd). ``enlarge``: with a larger buffer (fewer wake-ups per MiB; best
    effort), for a stream; a reply of a few KiB has no use for it."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    if enlarge:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


async def write_all(writer: trio.lowlevel.FdStream, data: bytes | memoryview) -> None:
    """Write to a client pipe; a closed read end becomes the EPIPE error clients expect."""
    try:
        await writer.send_all(data)
    except trio.BrokenResourceError:
        raise ProxyError(BROKEN_PIPE_TEXT, ErrorCode.EPIPE) from None
    except trio.ClosedResourceError:
        raise ProxyError("write to a pipe that was already closed", ErrorCode.OTHER) from None


async def splice_file(
    fd: int,
    size: int,
    writer: trio.lowlevel.FdStream,
    start: int = 0,
    *,
    read_once: bool = False,
    moved: Callable[[int], None] | None = None,
) -> int:
    """Copy bytes ``start`` to ``size`` of a file into a pipe in the kernel (sendfile), waiting while the pipe is
    full; the offset reached (``size``, or less if the file is shorter).

    ``read_once`` (a file streamed once, likely not in the page cache: a blob-cache file): each ``sendfile`` runs in
    a worker thread, so that waiting for the disk never blocks the event loop (it cannot wait for the client: the
    pipe does not block), and what was sent is dropped from the page cache a little behind (see
    :mod:`proxy.common.page_cache`). ``moved`` is told each count of bytes sent."""
    out = writer.fileno()
    offset = start
    behind = DropBehind(fd, start) if read_once else None
    while offset < size:
        try:
            if behind is None:
                sent = os.sendfile(out, fd, offset, min(size - offset, PIPE_SIZE))
            else:
                sent = await threads.run_sync(os.sendfile, out, fd, offset, min(size - offset, PIPE_SIZE))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(out)
            continue
        except BrokenPipeError:
            raise ProxyError(BROKEN_PIPE_TEXT, ErrorCode.EPIPE) from None
        if sent == 0:
            break  # the file shrank under us: the size check tells
        offset += sent
        if moved is not None:
            moved(sent)
        if behind is not None:
            behind.reached(offset)
        else:
            await trio.lowlevel.checkpoint()
    return offset


__all__ = ["CHUNK_SIZE", "PIPE_DEFAULT_SIZE", "PIPE_SIZE", "PIPE_SIZE_CAP", "open_pipe", "splice_file", "write_all"]
