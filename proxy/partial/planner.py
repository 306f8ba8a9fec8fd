"""Which byte ranges to ask a server for, and how (sans-I/O, like h11: no sockets, no trio).

A client asks for ranges in any order; the pipe carries them concatenated in that order. The planner turns
them into **spans**, the contiguous pieces of the blob that are actually fetched:

- consecutive ranges that go forward in the blob and are at most ``MERGE_GAP`` bytes apart become one span
  (the gap bytes are fetched and dropped: one request instead of two costs less than a KiB of waste);
- a range that goes backwards, or overlaps the one before, starts a new span, so every span is read once,
  front to back, and nothing is buffered to reorder output.

Spans up to ``SMALL_SPAN`` bytes may be fetched ahead of their turn (``PARALLEL_FETCHES`` at a time) and, on a
host known to answer multi-range requests properly, several of them in one request (a **batch** of at most
the host's ``max_ranges`` parts and ``BATCH_MAX_BYTES``). Larger spans are streamed when their turn comes.

:class:`HostRanges` is what we learnt about one host: multi-range support is unknown until a call has at
least ``MULTI_MIN_SPANS`` small spans to fetch, then probed once, on a blob of at most ``PROBE_MAX_BYTES``
(:func:`probe_choice`, :func:`probe_ranges`; why in ``proxy.partial.fetch``). Until a probe answered, a host
gets single ranges only. A 200 answer (the server ignored the ranges, as S3 and ECR do) marks the host
single-range for good; so does a probe answered 400 or 416; a 400 or 416 to a later request halves
``max_ranges``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import attrs

#: ranges closer than this are fetched as one span (containers/storage merges gaps under 1 KiB too)
MERGE_GAP = 1024
#: spans up to this size are fetched ahead of their turn, and may share a multi-range request
SMALL_SPAN = 1 << 20
#: the most small spans (or batches) in flight at once, per call: a small per-host limit
PARALLEL_FETCHES = 4
#: the most parts in one multi-range request, before any 400/416 halved it
MAX_RANGES_PER_REQUEST = 64
#: the most bytes one multi-range request asks for (its answer is held in memory to be put in order)
BATCH_MAX_BYTES = 4 << 20
#: a call needs at least this many small spans before an unprobed host is tried with a multi-range request
MULTI_MIN_SPANS = 3
#: the largest blob a host is probed on: what a probe answered 200 (the whole blob) can cost
PROBE_MAX_BYTES = 256 << 10
#: the smallest: the probe asks for three separate bytes
PROBE_MIN_BYTES = 5


class RangeError(ValueError):
    """A requested range is not inside the blob."""


@attrs.frozen
class ByteRange:
    offset: int
    length: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.length

    def header_part(self) -> str:
        return f"{self.offset}-{self.end - 1}"


@attrs.frozen
class Span:
    """Bytes ``[offset, offset + length)`` of the blob, fetched in one piece; ``pieces`` are the requested
    ranges inside it, in output order (ascending, non-overlapping)."""

    offset: int
    length: int
    pieces: tuple[ByteRange, ...]

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def range(self) -> ByteRange:
        return ByteRange(self.offset, self.length)

    def output(self, data: bytes | memoryview) -> Iterable[memoryview]:
        """The requested pieces out of the span's bytes."""
        view = memoryview(data)
        for piece in self.pieces:
            start = piece.offset - self.offset
            yield view[start : start + piece.length]


def check_within(ranges: Sequence[ByteRange], size: int, what: str) -> None:
    """RangeError naming the first range that is not inside a blob of ``size`` bytes."""
    for index, r in enumerate(ranges):
        if r.end > size:
            raise RangeError(
                f"range {index} (offset {r.offset}, length {r.length}) is outside {what}, which has {size} bytes"
            )


def plan_spans(ranges: Sequence[ByteRange], merge_gap: int = MERGE_GAP) -> list[Span]:
    """The spans that carry ``ranges`` in order (see the module docstring)."""
    spans: list[Span] = []
    start = end = 0
    pieces: list[ByteRange] = []
    for r in ranges:
        if pieces and end <= r.offset <= end + merge_gap:
            pieces.append(r)
            end = r.end
            continue
        if pieces:
            spans.append(Span(start, end - start, tuple(pieces)))
        start, end, pieces = r.offset, r.end, [r]
    if pieces:
        spans.append(Span(start, end - start, tuple(pieces)))
    return spans


def union(ranges: Iterable[ByteRange]) -> list[ByteRange]:
    """The ranges sorted, overlapping and touching ones merged: what a multi-range request asks for."""
    merged: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.offset):
        if merged and r.offset <= merged[-1].end:
            last = merged[-1]
            merged[-1] = ByteRange(last.offset, max(last.end, r.end) - last.offset)
        else:
            merged.append(r)
    return merged


def multi_range_header(ranges: Sequence[ByteRange]) -> str:
    return "bytes=" + ",".join(r.header_part() for r in ranges)


class Support(enum.Enum):
    UNKNOWN = "unknown"
    MULTI = "multi"  # answered a multi-range request with multipart/byteranges
    SINGLE = "single"  # ignored one (200) or refused down to one range: single ranges only


@attrs.define
class HostRanges:
    """What one host is known to do with multi-range requests; shared by every call to it."""

    support: Support = Support.UNKNOWN
    max_ranges: int = MAX_RANGES_PER_REQUEST

    def batch_size(self) -> int:
        """How many spans one request may carry: more than one only on a host that proved it can."""
        return self.max_ranges if self.support is Support.MULTI else 1

    def wants_probe(self, small_spans: int) -> bool:
        """Whether a call with ``small_spans`` small spans should probe the host first (two ranges, a TOC and
        its tar-split, are not worth it)."""
        return self.support is Support.UNKNOWN and small_spans >= MULTI_MIN_SPANS

    def multipart_seen(self) -> None:
        if self.support is Support.UNKNOWN:
            self.support = Support.MULTI

    def whole_body_seen(self) -> None:
        """A 200 to a multi-range request: never again (its body was abandoned, not read)."""
        self.support = Support.SINGLE
        self.max_ranges = 1

    def probe_refused(self) -> None:
        """A 400 or 416 to the probe's three ranges: single ranges from now on."""
        self.support = Support.SINGLE
        self.max_ranges = 1

    def refused(self) -> None:
        """A 400 or 416 to a multi-range request: ask for half as many parts at once."""
        self.max_ranges = max(1, self.max_ranges // 2)
        if self.max_ranges == 1:
            self.support = Support.SINGLE

    def broken_multipart(self) -> None:
        """A multipart answer we could not use (bad framing, wrong parts): single ranges from now on."""
        self.support = Support.SINGLE
        self.max_ranges = 1


@attrs.frozen
class Unit:
    """One step of a call: a large span streamed alone, or small spans fetched ahead (one request or
    several, see ``HostRanges``)."""

    spans: tuple[Span, ...]
    streamed: bool

    @property
    def length(self) -> int:
        return sum(s.length for s in self.spans)


def plan_units(spans: Sequence[Span], batch_size: int) -> list[Unit]:
    """Group consecutive small spans into units of at most ``batch_size`` spans and ``BATCH_MAX_BYTES``;
    every large span is a streamed unit of its own."""
    units: list[Unit] = []
    group: list[Span] = []
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            units.append(Unit(tuple(group), streamed=False))
        group, group_bytes = [], 0

    for span in spans:
        if span.length > SMALL_SPAN:
            flush()
            units.append(Unit((span,), streamed=True))
            continue
        if group and (len(group) >= batch_size or group_bytes + span.length > BATCH_MAX_BYTES):
            flush()
        group.append(span)
        group_bytes += span.length
    flush()
    return units


def small_span_count(spans: Sequence[Span]) -> int:
    return sum(1 for s in spans if s.length <= SMALL_SPAN)


def probe_choice(blobs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """The ``(digest, size)`` blobs a host may be probed on, cheapest first: those of ``PROBE_MIN_BYTES`` to
    ``PROBE_MAX_BYTES`` bytes, each once."""
    fitting = {digest: size for digest, size in blobs if PROBE_MIN_BYTES <= size <= PROBE_MAX_BYTES}
    return sorted(fitting.items(), key=lambda blob: (blob[1], blob[0]))


def probe_ranges(size: int) -> list[ByteRange]:
    """Three separate bytes of a ``size``-byte blob (first, middle, last): a server that serves them in one
    answer serves several ranges at once."""
    if size < PROBE_MIN_BYTES:
        raise ValueError(f"a {size}-byte blob is too small to probe")
    return [ByteRange(0, 1), ByteRange(size // 2, 1), ByteRange(size - 1, 1)]


class ByteMap:
    """Pieces of a blob received in any order (multipart parts); ``extract`` puts a range back together."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, bytes]] = []
        self.size = 0

    def add(self, offset: int, data: bytes) -> None:
        if data:
            self._parts.append((offset, data))
            self.size += len(data)

    def extract(self, wanted: ByteRange) -> bytes | None:
        """The bytes of ``wanted``, or None when the parts do not cover all of it."""
        out = bytearray(wanted.length)
        covered = union(
            ByteRange(max(offset, wanted.offset), min(offset + len(data), wanted.end) - max(offset, wanted.offset))
            for offset, data in self._parts
            if offset < wanted.end and offset + len(data) > wanted.offset
        )
        if len(covered) != 1 or covered[0] != wanted:
            return None
        for offset, data in self._parts:
            lo, hi = max(offset, wanted.offset), min(offset + len(data), wanted.end)
            if lo < hi:
                out[lo - wanted.offset : hi - wanted.offset] = data[lo - offset : hi - offset]
        return bytes(out)


__all__ = [
    "BATCH_MAX_BYTES",
    "MAX_RANGES_PER_REQUEST",
    "MERGE_GAP",
    "MULTI_MIN_SPANS",
    "PARALLEL_FETCHES",
    "PROBE_MAX_BYTES",
    "PROBE_MIN_BYTES",
    "SMALL_SPAN",
    "ByteMap",
    "ByteRange",
    "HostRanges",
    "RangeError",
    "Span",
    "SpanCutter",
    "Support",
    "Unit",
    "check_within",
    "multi_range_header",
    "plan_spans",
    "plan_units",
    "probe_choice",
    "probe_ranges",
    "small_span_count",
    "union",
]


class SpanCutter:
    """Cuts a span's bytes, as they stream in, into the requested pieces (the gap bytes are dropped)."""

    def __init__(self, span: Span) -> None:
        self._span = span
        self._position = span.offset
        self._index = 0

    @property
    def done(self) -> bool:
        return self._position >= self._span.end

    def feed(self, data: bytes | memoryview) -> list[memoryview]:
        view = memoryview(data)
        out: list[memoryview] = []
        pieces = self._span.pieces
        start = self._position
        end = start + len(view)
        while self._index < len(pieces):
            piece = pieces[self._index]
            lo, hi = max(piece.offset, start), min(piece.end, end)
            if lo < hi:
                out.append(view[lo - start : hi - start])
            if piece.end <= end:
                self._index += 1
                continue
            break
        self._position = end
        return out
