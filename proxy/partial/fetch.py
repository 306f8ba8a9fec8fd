"""Byte ranges of a registry blob: single-range requests in parallel, multi-range requests where a host
proved it answers them properly, every range with the stall deadline and resume logic of whole blobs.

A call goes through the planner (``proxy.partial.planner``): spans in output order, grouped into units.
Units of small spans are fetched ahead of their turn, at most ``PARALLEL_FETCHES`` at a time, into memory;
a large span is streamed when its turn comes. The output is written in request order whatever order the
fetches finish in::

    copy task (the caller)                       launcher (child task)
    for each unit, in order:                     for each unit, in order:
        wait until it is ready                       take a slot (at most PARALLEL_FETCHES)
        write it (or stream it, if large)            small: start a fetch task; large: ready at once
        give its slot back

Errors never escape a fetch task: they are stored with the unit and raised by the copy task when it reaches
that unit, so the error a client sees is the first one in request order (and never an ExceptionGroup).

A multi-range request is abandoned at once (connection closed, not drained) when the server answers 200
with the whole blob, and the host is marked single-range; 400 and 416 halve the parts per request; a
multipart answer that stalls, breaks its framing or lacks a range falls back to single ranges for what is
missing. A single range answered with 200 means the host cannot serve parts at all (RangesIgnored).
"""

from __future__ import annotations

import abc
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.http.errors import HTTPError
from proxy.http.ranges import parse_content_range
from proxy.partial.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartStart,
    boundary_of,
    is_multipart_byteranges,
)
from proxy.partial.planner import (
    BATCH_MAX_BYTES,
    PARALLEL_FETCHES,
    ByteMap,
    ByteRange,
    HostRanges,
    Span,
    SpanCutter,
    Unit,
    check_within,
    multi_range_header,
    plan_spans,
    plan_units,
    small_span_count,
    union,
)
from proxy.sources.base import SourceError
from proxy.sources.registry import RegistrySource

log = logging.getLogger(__name__)

Write = Callable[[memoryview], Awaitable[None]]

#: bytes asked per read of a streamed span
READ_SIZE = 1 << 20


class RangeSource(abc.ABC):
    """The bytes of one blob, by range. Close it (``async with``) when done."""

    #: "<reference>: blob <digest>", for error texts
    what: str
    size: int

    async def copy(self, ranges: Sequence[ByteRange], write: Write) -> None:
        """Write ``ranges`` concatenated, in order; RangeError (before writing anything) for a range that is
        not inside the blob."""
        check_within(ranges, self.size, self.what)
        await self.copy_spans(plan_spans(ranges), write)

    async def read(self, ranges: Sequence[ByteRange]) -> list[bytes]:
        """Each range's bytes, in memory (for small things: TOCs, footers)."""
        buffer = bytearray()

        async def collect(data: memoryview) -> None:
            buffer.extend(data)

        await self.copy(ranges, collect)
        out, at = [], 0
        for r in ranges:
            out.append(bytes(buffer[at : at + r.length]))
            at += r.length
        return out

    @abc.abstractmethod
    async def copy_spans(self, spans: Sequence[Span], write: Write) -> None: ...

    async def aclose(self) -> None:  # noqa: B027 - most hold nothing
        pass

    async def __aenter__(self) -> RangeSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------------------------ ordered fetching


@attrs.define(eq=False)
class _Slot:
    unit: Unit
    ready: trio.Event = attrs.field(factory=trio.Event)
    data: list[bytes] | None = None
    error: BaseException | None = None


async def copy_units(
    units: Sequence[Unit],
    fetch_small: Callable[[Sequence[Span]], Awaitable[list[bytes]]],
    stream_span: Callable[[Span, Write], Awaitable[None]],
    write: Write,
    parallel: int = PARALLEL_FETCHES,
) -> None:
    """The ordered window of the module docstring."""
    slots = [_Slot(unit) for unit in units]
    window = trio.Semaphore(parallel)
    failure: Exception | None = None

    async def fetch(slot: _Slot) -> None:
        try:
            slot.data = await fetch_small(slot.unit.spans)
        except Exception as e:
            slot.error = e
        finally:
            slot.ready.set()

    async def launch(nursery: trio.Nursery) -> None:
        for slot in slots:
            await window.acquire()
            if slot.unit.streamed:
                slot.ready.set()
            else:
                nursery.start_soon(fetch, slot)

    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(launch, nursery)
            for slot in slots:
                await slot.ready.wait()
                if slot.error is not None:
                    raise slot.error
                if slot.data is None:
                    await stream_span(slot.unit.spans[0], write)
                else:
                    for span, data in zip(slot.unit.spans, slot.data, strict=True):
                        for piece in span.output(data):
                            await write(piece)
                slot.data = None
                window.release()
        except Exception as e:
            failure = e
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


# ------------------------------------------------------------------------------------------ registry

#: what each registry client learnt about each host (a client lives as long as its process or session)
_HOSTS: weakref.WeakKeyDictionary[object, dict[str, HostRanges]] = weakref.WeakKeyDictionary()


def host_ranges(client: object, host: str) -> HostRanges:
    return _HOSTS.setdefault(client, {}).setdefault(host, HostRanges())


class RegistryRanges(RangeSource):
    """Ranges of a blob in a registry (``RegistrySource``), planned with what its host is known to do."""

    def __init__(self, source: RegistrySource, digest: str, size: int, what: str) -> None:
        self._source = source
        self._digest = digest
        self.size = size
        self.what = what
        self.host = host_ranges(source.client, source.domain)

    async def copy_spans(self, spans: Sequence[Span], write: Write) -> None:
        units = plan_units(spans, self.host.batch_size(small_span_count(spans)))
        await copy_units(units, self._fetch_small, self._stream_span, write)

    # -- single ranges -------------------------------------------------------------------------------

    async def _stream_span(self, span: Span, write: Write) -> None:
        blob = await self._source.open_blob_from(self._digest, span.offset, span.end)
        cutter = SpanCutter(span)
        async with blob:
            remaining = span.length
            while remaining:
                chunk = await blob.read(min(READ_SIZE, remaining))
                if not chunk:
                    raise SourceError(
                        f"{self.what}: the answer for bytes {span.offset}-{span.end - 1} ended {remaining} bytes early",
                        ErrorCode.RETRYABLE,
                    )
                remaining -= len(chunk)
                for piece in cutter.feed(chunk):
                    await write(piece)

    async def _fetch_single(self, span: Span) -> bytes:
        buffer = bytearray()

        async def collect(data: memoryview) -> None:
            buffer.extend(data)

        await self._stream_span(Span(span.offset, span.length, (span.range,)), collect)
        return bytes(buffer)

    async def _fetch_small(self, spans: Sequence[Span]) -> list[bytes]:
        """The whole bytes of each span (not cut into pieces: the copy task does that)."""
        if len(spans) == 1 or self.host.max_ranges == 1:
            return [await self._fetch_single(span) for span in spans]
        return await self._fetch_multi(spans)

    # -- multi-range ---------------------------------------------------------------------------------

    async def _fetch_multi(self, spans: Sequence[Span]) -> list[bytes]:
        wanted = union(span.range for span in spans)
        response, host = await self._source.request_ranges(self._digest, multi_range_header(wanted))
        status = response.status
        if status == 200:
            # S3, ECR, nginx with max_ranges: the whole blob follows. Not one more byte of it is read.
            await response.abandon()
            self.host.whole_body_seen()
            log.info("%s: %s ignores multi-range requests (200); single ranges from now on", self.what, host)
            return await self._refetch(spans)
        if status in (400, 416):
            await response.abandon()
            self.host.refused()
            log.info(
                "%s: %s refused %d ranges in one request (%d); now at most %d",
                self.what,
                host,
                len(wanted),
                status,
                self.host.max_ranges,
            )
            return await self._refetch(spans)
        parts = ByteMap()
        try:
            await self._receive_parts(response, host, parts)
        except (HTTPError, MultipartError, _BadPart) as e:
            await response.abandon()
            if not isinstance(e, HTTPError):
                self.host.broken_multipart()
            log.info("%s: multi-range answer from %s unusable (%s); fetching its ranges one by one", self.what, host, e)
        else:
            await response.aclose()
        out = []
        for span in spans:
            data = parts.extract(span.range)
            if data is None:
                if parts.size:
                    self.host.broken_multipart()
                data = await self._fetch_single(span)
            out.append(data)
        return out

    async def _refetch(self, spans: Sequence[Span]) -> list[bytes]:
        out: list[bytes] = []
        step = max(1, self.host.max_ranges)
        for i in range(0, len(spans), step):
            out.extend(await self._fetch_small(spans[i : i + step]))
        return out

    async def _receive_parts(self, response, host: str, parts: ByteMap) -> None:
        content_type = response.headers.get("content-type")
        limit = min(self.size, 2 * BATCH_MAX_BYTES)
        if not is_multipart_byteranges(content_type):
            # one part: the server coalesced everything into a single range
            got = parse_content_range(response.headers.get("content-range"))
            if got is None or (got.total is not None and got.total != self.size):
                raise _BadPart(f"a 206 with Content-Range {response.headers.get('content-range')!r}")
            data = await response.read_all(limit)
            if len(data) != got.length:
                raise _BadPart(f"a {len(data)}-byte body for Content-Range {got.start}-{got.end}")
            parts.add(got.start, data)
            return
        boundary = boundary_of(content_type)
        if boundary is None:
            raise MultipartError(f"no usable boundary in Content-Type {content_type!r}")
        parser = MultipartParser(boundary)
        offset = 0
        pieces: list[bytes] = []
        while True:
            chunk = await response.read_some(READ_SIZE)
            events = parser.feed(chunk) if chunk else []
            for event in events:
                if isinstance(event, PartStart):
                    got = event.content_range
                    if got.total is not None and got.total != self.size:
                        raise _BadPart(f"a part of a {got.total}-byte resource, the blob has {self.size}")
                    if pieces:
                        parts.add(offset, b"".join(pieces))
                    offset, pieces = got.start, []
                elif isinstance(event, PartData):
                    pieces.append(event.data)
                    if parts.size + sum(map(len, pieces)) > limit:
                        raise _BadPart(f"more than {limit} bytes in the answer")
            if not chunk:
                parser.end()
                break
        if pieces:
            parts.add(offset, b"".join(pieces))
        self.host.multipart_seen()
        log.debug("%s: %s answered a multi-range request with multipart/byteranges", self.what, host)


class _BadPart(Exception):
    pass


async def learn_size(source: RegistrySource, digest: str, what: str) -> int:
    """The size of a blob the manifest does not name: from the Content-Range of its first byte."""
    blob = await source.open_blob_from(digest, 0, 1)
    async with blob:
        size = blob.size
    if size < 0:
        raise ProxyError(f"{what}: the registry did not say how large the blob is")
    return size


__all__ = ["RangeSource", "RegistryRanges", "copy_units", "host_ranges", "learn_size"]
