"""Ranges of a blob without the network: a verified file in the blob cache, a blob file of an ``oci:`` or
``dir:`` layout, a member of an archive (read with pread at its offset), or, for a blob a source can only
stream (a compressed ``docker-archive:`` layer, an in-memory config), by reading forward and dropping what
lies between the ranges (a range behind the current position opens the blob again).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence

from protocol.errors import ProxyError
from proxy.common import threads
from proxy.partial.fetch import READ_SIZE, RangeSource, Write
from proxy.partial.planner import Span, SpanCutter
from proxy.sources.base import Blob


class FileRanges(RangeSource):
    """``size`` bytes of an open file from ``base``, read with pread; ``close`` releases the file."""

    def __init__(self, fd: int, base: int, size: int, what: str, close: Callable[[], Awaitable[None]]) -> None:
        self._fd = fd
        self._base = base
        self.size = size
        self.what = what
        self._close = close

    async def copy_spans(self, spans: Sequence[Span], write: Write) -> None:
        for span in spans:
            for piece in span.pieces:
                at, remaining = piece.offset, piece.length
                while remaining:
                    n = min(READ_SIZE, remaining)
                    data = await threads.run_sync(os.pread, self._fd, n, self._base + at)
                    if not data:
                        raise ProxyError(f"{self.what}: the file ended at byte {at}, before the blob's {self.size}")
                    await write(memoryview(data))
                    at += len(data)
                    remaining -= len(data)

    async def aclose(self) -> None:
        await self._close()


class SequentialRanges(RangeSource):
    """A blob that can only be read from its start."""

    def __init__(self, first: Blob, reopen: Callable[[], Awaitable[Blob]], size: int, what: str) -> None:
        self._blob: Blob | None = first
        self._reopen = reopen
        self._position = 0
        self.size = size
        self.what = what

    async def copy_spans(self, spans: Sequence[Span], write: Write) -> None:
        for span in spans:
            if self._blob is None or self._position > span.offset:
                if self._blob is not None:
                    await self._blob.aclose()
                self._blob = None
                self._blob = await self._reopen()
                self._position = 0
            await self._skip_to(span.offset)
            cutter = SpanCutter(span)
            while not cutter.done:
                data = await self._blob.read(min(READ_SIZE, span.end - self._position))
                if not data:
                    raise ProxyError(f"{self.what}: the blob ended at byte {self._position}, before {span.end}")
                self._position += len(data)
                for piece in cutter.feed(data):
                    await write(piece)

    async def _skip_to(self, offset: int) -> None:
        assert self._blob is not None
        while self._position < offset:
            data = await self._blob.read(min(READ_SIZE, offset - self._position))
            if not data:
                raise ProxyError(f"{self.what}: the blob ended at byte {self._position}, before {offset}")
            self._position += len(data)

    async def aclose(self) -> None:
        if self._blob is not None:
            blob, self._blob = self._blob, None
            await blob.aclose()


def ranges_of_blob(blob: Blob, reopen: Callable[[], Awaitable[Blob]], what: str, size: int | None) -> RangeSource:
    """The best way to read ranges of an open blob: pread where it is a file, else forward reads."""
    known = blob.size if blob.size >= 0 else size
    if known is None:
        raise ProxyError(f"{what}: the source does not say how large the blob is")
    window = blob.window()
    if window is not None:
        # a section of a file: a verified blob-cache file, oci:, dir:, an archive member stored uncompressed
        return FileRanges(window.fd, window.offset, known, what, blob.aclose)
    return SequentialRanges(blob, reopen, known, what)


__all__ = ["FileRanges", "SequentialRanges", "ranges_of_blob"]
