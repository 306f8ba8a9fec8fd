"""Kernel pipes handed to the client, and the producers that fill them.

A ``Pipe`` is one ``os.pipe()``: the read end travels to the client (SCM_RIGHTS) and is closed
here once sent; the write end stays ours until FinishPipe (or session end). A producer is a task
in the session nursery that writes into the write end and records its outcome; FinishPipe awaits
that outcome without holding anything else. Writes have no deadline (a slow consumer is allowed)
but are always cancellable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable

import attrs
import trio

from protocol.codec import encode_json
from protocol.errors import ErrorCode, ProxyError
from proxy.sources.base import Blob

log = logging.getLogger(__name__)

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

BROKEN_PIPE_TEXT = "write |1: broken pipe"


def _enlarge(fd: int) -> None:
    """Ask for a bigger pipe buffer: fewer wake-ups per MiB. Best effort."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def open_pipe() -> tuple[int, int]:
    """A close-on-exec pipe with an enlarged buffer: (read_fd, write_fd)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    _enlarge(write_fd)
    return read_fd, write_fd


@attrs.define(eq=False)
class Pipe:
    """A pipe whose write end the server owns; ``pipeid`` is the write fd number, as in Go."""

    read_fd: int
    writer: trio.lowlevel.FdStream
    pipeid: int
    done: trio.Event = attrs.field(factory=trio.Event)
    error: ProxyError | None = None

    @classmethod
    def create(cls) -> Pipe:
        """A new pipe; ProxyError (retryable) when the process has no fd left for it."""
        try:
            read_fd, write_fd = open_pipe()
        except OSError as e:
            log.error("cannot create a pipe: %s", e.strerror)
            raise ProxyError(f"cannot create a pipe: {e.strerror}", ErrorCode.RETRYABLE) from None
        return cls(read_fd=read_fd, writer=trio.lowlevel.FdStream(write_fd), pipeid=write_fd)

    def close_now(self) -> None:
        """Close both ends of a pipe that was never handed out (synchronous)."""
        os.close(self.read_fd)
        self.writer.close()

    def finish(self, error: ProxyError | None) -> None:
        self.error = error
        self.done.set()

    async def aclose(self) -> None:
        await self.writer.aclose()


async def write_all(writer: trio.lowlevel.FdStream, data: bytes | memoryview) -> None:
    """Write to a client pipe; a closed read end becomes the EPIPE error clients expect."""
    try:
        await writer.send_all(data)
    except trio.BrokenResourceError:
        raise ProxyError(BROKEN_PIPE_TEXT, ErrorCode.EPIPE) from None
    except trio.ClosedResourceError:
        raise ProxyError("write to a pipe that was already closed", ErrorCode.OTHER) from None


class DigestVerifier:
    """Running size and digest of a byte stream, checked against what the client expects."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        algo, _, self._hex = digest.partition(":")
        self._hash = hashlib.new(algo)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def matches(self) -> bool:
        return self._hash.hexdigest() == self._hex

    def check(self, expected_size: int | None) -> ProxyError | None:
        """The error FinishPipe reports, with the Go server's texts (digest error wins)."""
        error = None
        if expected_size is not None and self.size != expected_size:
            error = ProxyError(f"expected {expected_size} bytes in blob, got {self.size}")
        if not self.matches():
            error = ProxyError(f"corrupted blob, expecting {self.digest}")
        return error


async def run_producer(pipe: Pipe, work: Callable[[], Awaitable[None]]) -> None:
    """Run a producer's work and finish the pipe with what FinishPipe is to report: nothing, the ProxyError it
    raised, or an internal error (logged) for anything else."""
    error: ProxyError | None = None
    try:
        await work()
    except ProxyError as e:
        error = e
    except Exception as e:
        log.exception("pipe %d: producer failed", pipe.pipeid)
        error = ProxyError(f"internal error: {type(e).__name__}: {e}")
    finally:
        pipe.finish(error)


async def produce_bytes(pipe: Pipe, data: bytes) -> None:
    """Producer for manifests, configs and layer info: an in-memory buffer."""

    async def work() -> None:
        await write_all(pipe.writer, data)

    await run_producer(pipe, work)


async def copy_verified(blob: Blob, writer: trio.lowlevel.FdStream, verifier: DigestVerifier) -> None:
    """Copy a blob into a pipe, feeding every byte to the verifier."""
    while True:
        chunk = await blob.read(CHUNK_SIZE)
        if not chunk:
            return
        verifier.update(chunk)
        await write_all(writer, chunk)


async def copy_unhashed(blob: Blob, writer: trio.lowlevel.FdStream) -> int:
    """Copy a blob that verifies itself into a pipe; the number of bytes copied."""
    total = 0
    while chunk := await blob.read(CHUNK_SIZE):
        total += len(chunk)
        await write_all(writer, chunk)
    return total


async def splice_file(fd: int, size: int, writer: trio.lowlevel.FdStream, start: int = 0) -> int:
    """Copy bytes ``start`` to ``size`` of a file into a pipe in the kernel (sendfile), waiting while the pipe is
    full; the offset reached (``size``, or less if the file is shorter)."""
    out = writer.fileno()
    offset = start
    while offset < size:
        try:
            sent = os.sendfile(out, fd, offset, min(size - offset, PIPE_SIZE))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(out)
            continue
        except BrokenPipeError:
            raise ProxyError(BROKEN_PIPE_TEXT, ErrorCode.EPIPE) from None
        if sent == 0:
            break  # the file shrank under us: the size check below tells
        offset += sent
        await trio.lowlevel.checkpoint()
    return offset


async def produce_blob(pipe: Pipe, blob: Blob, digest: str, expected_size: int) -> None:
    """Producer for GetBlob: stream, then report size and digest errors via FinishPipe.

    A blob the cache already verified (it has ``spliceable_fd``) goes through the kernel with sendfile.
    """

    async def work() -> None:
        async with blob:
            fd = getattr(blob, "spliceable_fd", None)
            if fd is not None:
                sent = await splice_file(fd, blob.size, pipe.writer)
                if sent != expected_size:
                    raise ProxyError(f"expected {expected_size} bytes in blob, got {sent}")
                return
            if blob.verifies_digest:
                # a blob-cache download hashes every byte itself and fails rather than end short or wrong:
                # only the size the client expects is left to check. Its file goes into the pipe by sendfile.
                splice_into = getattr(blob, "splice_into", None)
                if splice_into is not None:
                    sent = await splice_into(pipe.writer)
                else:
                    sent = await copy_unhashed(blob, pipe.writer)
                if sent != expected_size:
                    raise ProxyError(f"expected {expected_size} bytes in blob, got {sent}")
                return
            verifier = DigestVerifier(digest)
            await copy_verified(blob, pipe.writer, verifier)
        error = verifier.check(expected_size)
        if error is not None:
            raise error

    await run_producer(pipe, work)


def encode_error_fd_payload(error: ProxyError) -> bytes:
    """What GetRawBlob writes to its error fd: ``{"code": ..., "message": ...}``."""
    return encode_json({"code": str(error.code), "message": error.message})


async def produce_raw_blob(
    blob: Blob, digest: str, data_writer: trio.lowlevel.FdStream, err_writer: trio.lowlevel.FdStream
) -> None:
    """Producer for GetRawBlob: data on one fd, at most one error document on the other.

    Unlike the Go server we verify the digest: a client that forgot to is still protected,
    and one that did sees the same bytes. The error fd is closed first, then the data fd.
    """
    error: ProxyError | None = None
    try:
        verifier = DigestVerifier(digest)
        async with blob:
            await copy_verified(blob, data_writer, verifier)
        error = verifier.check(None)
    except ProxyError as e:
        error = e
    except Exception as e:
        log.exception("raw blob %s: producer failed", digest)
        error = ProxyError(f"internal error: {type(e).__name__}: {e}")
    finally:
        try:
            if error is not None:
                log.debug("raw blob %s: %s", digest, error)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await err_writer.send_all(encode_error_fd_payload(error))
        finally:
            with trio.CancelScope(shield=True):
                await err_writer.aclose()
                await data_writer.aclose()
