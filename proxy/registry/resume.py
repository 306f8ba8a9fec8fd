"""A blob body that survives the network: stalls, resets, short bodies and TLS closes become a resume.

The reader hands out one continuous stream. When a read fails in a way that may pass (the HTTP client
marks it retryable: a stall deadline, a reset, a connection closed before the declared length), the
connection is dropped and the blob is asked for again from the verified offset with
``Range: bytes=<offset>-`` through the registry URL (so redirects and tokens are fresh). A 206 counts only
if its Content-Range starts at that offset and its total matches; a 200 counts after the bytes already
delivered are skipped. The consumer's running digest therefore sees every byte exactly once.

Resumes are budgeted so that a blob that stops completely is reported in bounded time: at most
``max_resumes`` in all, and at most ``max_unproductive`` in a row that each brought less than
``progress_bytes`` and came sooner than ``progress_seconds`` after the previous one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from protocol.errors import ErrorCode
from proxy.http.connection import Response
from proxy.http.errors import ConnectionLost, HTTPError, HTTPTimeoutError, ProtocolError, StallError, TLSError
from proxy.http.ranges import parse_content_range
from proxy.registry.settings import ResumePolicy
from proxy.server.metrics import STATS, Fetch
from proxy.sources.base import Blob, SourceError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: bytes read (and dropped) per read while skipping what a 200 answer repeats
SKIP_CHUNK = 1 << 20


class ResumeRefused(Exception):
    """A reopened body that cannot continue the stream (wrong range, error status)."""


#: opens the blob again from an offset: (response positioned at that offset or at 0, where it came from)
Reopen = Callable[[int], Awaitable[tuple[Response, str]]]


def resume_cause(cause: BaseException) -> str:
    """Why a body broke off, as a ``cause`` label (proxy.server.metrics.RESUME_CAUSES)."""
    for kind, name in (
        (StallError, "stall"),
        (ConnectionLost, "reset"),
        (HTTPTimeoutError, "timeout"),
        (TLSError, "tls"),
        (ProtocolError, "protocol"),
        (ResumeRefused | SourceError, "refused"),
    ):
        if isinstance(cause, kind):
            return name
    return "other"


class ResumingBlob(Blob):
    """A registry blob's body (see the module docstring); its ``fetch`` tells where its bytes came from, its
    resumes and their causes (for the transfer's log line, ``image-proxy status`` and the metrics)."""

    origin = "network"

    def __init__(
        self,
        *,
        what: str,
        response: Response,
        host: str,
        reopen: Reopen,
        policy: ResumePolicy,
    ) -> None:
        self._what = what
        self._response = response
        self._host = host
        self._reopen = reopen
        self._policy = policy
        length = response.content_length
        self.size = length if length is not None else -1
        self.offset = 0
        if response.status == 206:  # asked from an offset (see start_at)
            got = parse_content_range(response.headers.get("content-range"))
            if got is not None:
                self.size = got.total if got.total is not None else -1
        self.resumes = 0
        self._unproductive = 0
        self._started = self._last_resume = self._last_progress = trio.current_time()
        self._offset_at_resume = 0
        self.fetch: Fetch = STATS.new_fetch(host)

    async def start_at(self, offset: int) -> None:
        """Position a body that was asked for with ``Range: bytes=<offset>-`` (a 206 must start there; a
        200 is skipped up to it). Raises SourceError when the answer cannot continue at ``offset``."""
        self.offset = offset
        self._offset_at_resume = offset
        if offset == 0:
            return
        if self._response.status == 200:
            length = self._response.content_length
            self.size = length if length is not None else -1
        try:
            await self._continue_from(self._response)
        except (ResumeRefused, HTTPError) as e:
            raise SourceError(f"{self._what}: cannot continue at byte {offset}: {e}", ErrorCode.RETRYABLE) from None

    async def read(self, max_bytes: int) -> bytes:
        return await self._resuming(lambda: self._response.read_some(max_bytes), len)

    async def read_into(self, buffer: memoryview) -> int:
        return await self._resuming(lambda: self._response.read_into(buffer), int)

    async def _resuming(self, read: Callable[[], Awaitable[T]], count: Callable[[T], int]) -> T:
        """One read of the body, resumed from the verified offset as long as its failures may pass."""
        while True:
            try:
                result = await read()
            except HTTPError as e:
                if not e.retryable:
                    raise SourceError(f"{self._what}: at byte {self._position()}: {e}") from None
                await self._resume(e)
                continue
            if got := count(result):
                self.offset += got
                self._last_progress = trio.current_time()
                self.fetch.got(got)
            else:
                self._log_done()
            return result

    def _position(self) -> str:
        return f"{self.offset} of {self.size}" if self.size >= 0 else str(self.offset)

    def _allowed(self) -> bool:
        now = trio.current_time()
        productive = (
            self.offset - self._offset_at_resume >= self._policy.progress_bytes
            or now - self._last_resume >= self._policy.progress_seconds
        )
        self._unproductive = 0 if productive else self._unproductive + 1
        return self.resumes < self._policy.max_resumes and self._unproductive <= self._policy.max_unproductive

    async def _resume(self, cause: Exception) -> None:
        await self._response.abandon()
        while True:
            kind = resume_cause(cause)
            if isinstance(cause, StallError):
                log.warning(
                    "%s: stalled at byte %s from %s (no data for %g s)",
                    self._what,
                    self._position(),
                    self._host,
                    cause.seconds,
                )
            if not self._allowed():
                raise SourceError(
                    f"{self._what}: giving up at byte {self._position()} from {self._host} after "
                    f"{self.resumes} resumes: {cause}",
                    ErrorCode.RETRYABLE,
                )
            self.resumes += 1
            self._last_resume = trio.current_time()
            self._offset_at_resume = self.offset
            self.fetch.resumed(kind, f"{kind} at byte {self.offset} from {self._host}")
            log.warning(
                "%s: resuming at byte %s (resume %d, after a %s from %s): %s",
                self._what,
                self._position(),
                self.resumes,
                kind,
                self._host,
                cause,
            )
            try:
                response, host = await self._reopen(self.offset)
                await self._continue_from(response)
            except (ResumeRefused, HTTPError, SourceError) as e:
                cause = e
                continue
            self._response, self._host = response, host
            self.fetch.switched(host)
            return

    async def _continue_from(self, response: Response) -> None:
        """Position a reopened body at ``self.offset`` (or refuse it, closing it)."""
        try:
            if response.status == 206:
                header = response.headers.get("content-range")
                got = parse_content_range(header)
                if got is None or got.start != self.offset:
                    raise ResumeRefused(f"asked for bytes from {self.offset}, got Content-Range {header!r}")
                if self.size >= 0 and got.total is not None and got.total != self.size:
                    raise ResumeRefused(f"Content-Range total {got.total} differs from the blob size {self.size}")
                return
            if response.status == 200:
                length = response.content_length
                if self.size >= 0 and length is not None and length != self.size:
                    raise ResumeRefused(f"a whole-blob answer of {length} bytes, but the blob has {self.size}")
                await self._skip(response, self.offset)
                return
            raise ResumeRefused(f"{response.status} {response.reason} to a range request")
        except BaseException:
            await response.abandon()
            raise

    @staticmethod
    async def _skip(response: Response, count: int) -> None:
        """Drop the ``count`` bytes of a 200 answer that were already delivered (reading, never seeking)."""
        while count:
            chunk = await response.read_some(min(SKIP_CHUNK, count))
            if not chunk:
                raise ResumeRefused("the whole-blob answer ended before the resume offset")
            count -= len(chunk)
        # read_some never returns more than asked, so the next byte is the first undelivered one

    def _log_done(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        elapsed = max(trio.current_time() - self._started, 1e-9)
        log.debug(
            "%s: %d bytes from %s, %d resumes, %.1f MB/s, last progress %.2f s after start",
            self._what,
            self.offset,
            self._host,
            self.resumes,
            self.offset / elapsed / 1e6,
            self._last_progress - self._started,
        )

    async def aclose(self) -> None:
        if self._response.complete:
            await self._response.aclose()
        else:
            await self._response.abandon()
