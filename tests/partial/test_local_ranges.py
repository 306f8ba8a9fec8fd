"""Ranges of blobs a transport can only stream (read forward; a range behind the position reopens the blob)."""

from __future__ import annotations

from proxy.partial.local import SequentialRanges, ranges_of_blob
from proxy.partial.planner import ByteRange
from proxy.sources.base import BytesBlob

DATA = bytes(range(256)) * 40


async def test_forward_reads_and_reopening():
    opened = []

    async def reopen():
        opened.append(1)
        return BytesBlob(DATA)

    source = ranges_of_blob(BytesBlob(DATA), reopen, "blob X", None)
    assert isinstance(source, SequentialRanges)
    ranges = [ByteRange(100, 10), ByteRange(5000, 3), ByteRange(50, 60), ByteRange(10_239, 1)]
    async with source:
        assert await source.read(ranges) == [DATA[r.offset : r.end] for r in ranges]
    assert len(opened) == 1  # once, for the range behind the position
