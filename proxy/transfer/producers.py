"""The producers that fill the pipes of GetManifest/GetConfig (bytes), GetBlob and GetRawBlob, all through one
transfer path: ``send_blob``.

A blob that verifies itself (a cached blob checked when opened, a reader of a cache download that fails rather
than end short or wrong) goes into the pipe as it can, by ``sendfile`` from its file (``Blob.send_to``); any
other blob is read and hashed on its way, and its size and digest are checked at the end (FinishPipe, or
GetRawBlob's error fd, reports what was wrong). Writes have no deadline (a slow reader is allowed) but are always
cancellable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import trio

from protocol.codec import encode_error_document
from protocol.digests import DigestVerifier
from protocol.errors import ProxyError, size_mismatch
from proxy.common.pipes import write_all
from proxy.sources.base import Blob
from proxy.transfer.pipe import Pipe, run_producer
from proxy.transfer.pump import pump

log = logging.getLogger(__name__)


async def send_blob(
    blob: Blob, writer: trio.lowlevel.FdStream, digest: str, moved: Callable[[int], None] | None = None
) -> tuple[int, DigestVerifier | None]:
    """Every byte of ``blob`` into a pipe: the number sent, and the verifier that hashed them (None when the blob
    verified itself). ``moved`` is told each count of bytes written (a transfer's progress)."""
    if blob.verifies_digest:
        return await blob.send_to(writer, moved), None
    verifier = DigestVerifier(digest)
    if moved is None:
        deliver = functools.partial(write_all, writer)
    else:

        async def deliver(chunk: memoryview) -> None:
            await write_all(writer, chunk)
            moved(len(chunk))

    await pump(blob, verifier.update, deliver=deliver)
    return verifier.size, verifier


async def produce_bytes(pipe: Pipe, data: bytes) -> None:
    """Producer for manifests, configs and layer info: an in-memory buffer."""

    async def work() -> None:
        await write_all(pipe.writer, data)

    await run_producer(pipe, work)


async def produce_blob(
    pipe: Pipe, blob: Blob, digest: str, expected_size: int, moved: Callable[[int], None] | None = None
) -> None:
    """Producer for GetBlob: the blob into the pipe, then its size (and digest, unless the blob verified itself)
    checked against what the client expects; FinishPipe reports the Go server's texts."""

    async def work() -> None:
        async with blob:
            sent, verifier = await send_blob(blob, pipe.writer, digest, moved)
        error = verifier.check(expected_size) if verifier is not None else None
        if verifier is None and sent != expected_size:
            error = size_mismatch(expected_size, sent)
        if error is not None:
            raise error

    await run_producer(pipe, work)


async def produce_raw_blob(
    blob: Blob,
    digest: str,
    data_writer: trio.lowlevel.FdStream,
    err_writer: trio.lowlevel.FdStream,
    moved: Callable[[int], None] | None = None,
) -> ProxyError | None:
    """Producer for GetRawBlob: data on one fd, at most one error document on the other.

    Unlike the Go server we verify the digest: a client that forgot to is still protected, and one that did sees
    the same bytes. The error fd is closed first, then the data fd. Returns the error sent (None: none).
    """
    error: ProxyError | None = None
    try:
        async with blob:
            _, verifier = await send_blob(blob, data_writer, digest, moved)
        error = verifier.check(None) if verifier is not None else None
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
                    await err_writer.send_all(encode_error_document(error))
        finally:
            with trio.CancelScope(shield=True):
                await err_writer.aclose()
                await data_writer.aclose()
    return error


__all__ = ["produce_blob", "produce_bytes", "produce_raw_blob", "send_blob"]
