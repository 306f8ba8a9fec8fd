"""proxy.transfer.pipe.Pipe: the write end is non-blocking from the start and the read end (the client's) is not;
the trio stream over the write end is made only when a producer needs it, and never over a closed fd number."""

from __future__ import annotations

import fcntl
import os

import pytest

from protocol.errors import ProxyError
from proxy.transfer.pipe import Pipe


def blocking(fd: int) -> bool:
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_a_small_reply_is_written_at_once_without_a_stream():
    pipe = Pipe.create(enlarge=False)
    try:
        assert not blocking(pipe.pipeid) and blocking(pipe.read_fd)
        assert pipe.write_now(b"manifest") == len(b"manifest")
        pipe.close()
        assert os.read(pipe.read_fd, 100) == b"manifest"
        assert os.read(pipe.read_fd, 100) == b""  # the write end is closed: EOF
    finally:
        os.close(pipe.read_fd)


def test_write_now_takes_what_fits_and_never_blocks():
    pipe = Pipe.create(enlarge=False)
    try:
        big = b"x" * (4 << 20)  # more than any pipe holds
        written = pipe.write_now(big)
        assert 0 < written < len(big)
        assert pipe.write_now(big) == 0  # full: nothing more, and no wait
    finally:
        pipe.close()
        os.close(pipe.read_fd)


async def test_a_producer_gets_a_stream_and_a_closed_pipe_none():
    pipe = Pipe.create()
    try:
        await pipe.writer.send_all(b"data")
        assert pipe.writer is pipe.writer  # made once
        pipe.close()
        pipe.close()  # twice is harmless: the fd is closed once
        assert os.read(pipe.read_fd, 100) == b"data" and os.read(pipe.read_fd, 100) == b""
    finally:
        os.close(pipe.read_fd)
    late = Pipe.create()
    os.close(late.read_fd)
    late.close()
    # a producer that starts after the session closed the pipe must not wrap an fd number that may be reused
    reused = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(ProxyError, match="already closed"):
            late.writer  # noqa: B018
    finally:
        os.close(reused)
