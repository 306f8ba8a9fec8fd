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

**Probing a host.** A host is asked for several ranges at once only after a probe showed it answers them:
three single bytes of the smallest blob of the same image that has at most ``PROBE_MAX_BYTES`` (256 KiB):
its config as a rule, or the blob being read when it is smaller. A host that ignores multi-range requests
(S3, ECR, nginx with ``max_ranges 1``) answers with that whole blob, so the probe costs at most 256 KiB of
body whatever any socket buffer holds (159 bytes for the test image's config); that body is read, so its
connection is kept. Without such a blob the host is not probed: single ranges, which cost nothing extra.

Why not probe on the blob the call wants and abandon a 200 at once? Because what a server sends before we
close is set by socket buffers, mostly the server's. Against Debian nginx 1.22 with ``max_ranges 1`` on
loopback (Linux 6.18), GetBlobAt of 3 ranges of a 100 MiB blob made nginx hand its socket 3.92 MB for the
abandoned 200 (``$body_bytes_sent``; tests/partial/test_nginx.py). A fresh probe connection with ``SO_RCVBUF``
set before connect (which also turns autotuning off) hardly changes that: 64 KiB gave 3.91 MB, 16 KiB
2.75 to 3.60 MB, since nginx's send buffer grows on its own up to ``tcp_wmem``'s maximum (4 MiB). Only a
4 KiB buffer with ``TCP_MAXSEG`` 536 brought it to 45 to 100 KB, through how Linux sizes a sender's buffer
from its peer's segment size: nothing a client can count on from S3's servers, or anyone's. Probing on a
small blob is bounded by that blob, which no buffer changes, for one extra small request per host.

After a probe, a multi-range request answered 200 (a host whose small and large blobs are served
differently) is abandoned at once (connection closed, not drained) and the host is marked single-range;
400 and 416 halve the parts per request; a multipart answer that stalls, breaks its framing or lacks a
range falls back to single ranges for what is missing. A single range answered with 200 means the host
cannot serve parts at all (RangesIgnored).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from protocol.client.tasks import failing_fast
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
    PROBE_MAX_BYTES,
    ByteMap,
    ByteRange,
    HostRanges,
    Span,
    SpanCutter,
    Support,
    Unit,
    check_within,
    multi_range_header,
    plan_spans,
    plan_units,
    probe_choice,
    probe_ranges,
    small_span_count,
    union,
)
from proxy.registry.source import RegistrySource
from proxy.sources.base import SourceError

log = logging.getLogger(__name__)

#: where a copy writes its bytes; the data is valid only until the call returns (a streamed span reuses its buffer)
Write = Callable[[memoryview], Awaitable[None]]

#: bytes asked per read of a streamed span
READ_SIZE = 1 << 20
#: how many blobs a probe tries before giving up for this call (one may be missing: a converted config)
PROBE_ATTEMPTS = 2
#: the most of an error answer to the probe (400, 416) that is read to keep its connection
PROBE_ERROR_BODY = 64 * 1024


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

    async with failing_fast() as nursery:  # a failure is raised as itself, the fetches ahead cancelled
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
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------ registry


@attrs.define(eq=False)
class _Host:
    ranges: HostRanges = attrs.Factory(HostRanges)
    #: held while the host is probed: calls that would probe it too wait for the verdict
    probing: trio.Lock = attrs.Factory(trio.Lock)
    #: blobs a probe could not use for good (not there, refused): not tried again
    unusable: set[str] = attrs.Factory(set)


#: what each registry client learnt about each host (a client lives as long as its process or session)
_HOSTS: weakref.WeakKeyDictionary[object, dict[str, _Host]] = weakref.WeakKeyDictionary()


def _host(client: object, host: str) -> _Host:
    return _HOSTS.setdefault(client, {}).setdefault(host, _Host())


def host_ranges(client: object, host: str) -> HostRanges:
    return _host(client, host).ranges


class RegistryRanges(RangeSource):
    """Ranges of a blob in a registry (``RegistrySource``), planned with what its host is known to do.

    ``probe_blobs`` are other ``(digest, size)`` blobs of the same repository (the image's config and
    layers): the smallest one that fits is where an unprobed host is probed (see the module docstring)."""

    def __init__(
        self,
        source: RegistrySource,
        digest: str,
        size: int,
        what: str,
        probe_blobs: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._source = source
        self._digest = digest
        self.size = size
        self.what = what
        self._state = _host(source.client, source.domain)
        self.host = self._state.ranges
        self._probe_blobs = [(digest, size), *probe_blobs]

    async def copy_spans(self, spans: Sequence[Span], write: Write) -> None:
        if self.host.wants_probe(small_span_count(spans)):
            await self._probe()
        units = plan_units(spans, self.host.batch_size())
        await copy_units(units, self._fetch_small, self._stream_span, write)

    # -- probing -------------------------------------------------------------------------------------

    async def _probe(self) -> None:
        """Learn whether the host answers multi-range requests, on a small blob (at most PROBE_ATTEMPTS
        tries); a host that could not be probed stays unknown, and this call uses single ranges."""
        state = self._state
        async with state.probing:
            if self.host.support is not Support.UNKNOWN:
                return  # another call probed it meanwhile
            candidates = [blob for blob in probe_choice(self._probe_blobs) if blob[0] not in state.unusable]
            for digest, size in candidates[:PROBE_ATTEMPTS]:
                try:
                    await self._probe_on(digest, size)
                    return
                except (SourceError, HTTPError) as e:
                    if isinstance(e, SourceError) and e.code is not ErrorCode.RETRYABLE:
                        state.unusable.add(digest)
                    log.info("%s: probing for multi-range support on blob %s failed: %s", self.what, digest, e)
            if not candidates:
                log.debug("%s: no blob of at most %d bytes to probe on: single ranges", self.what, PROBE_MAX_BYTES)

    async def _probe_on(self, digest: str, size: int) -> None:
        wanted = probe_ranges(size)
        response, host = await self._source.request_ranges(digest, multi_range_header(wanted))
        status = response.status
        if status == 200:
            # the whole probe blob, at most PROBE_MAX_BYTES: read it so the connection can be reused
            with contextlib.suppress(HTTPError):
                await response.read_all(PROBE_MAX_BYTES)
            await response.aclose()
            self.host.whole_body_seen()
            log.info("%s: %s ignores multi-range requests (200 for blob %s); single ranges", self.what, host, digest)
            return
        if status in (400, 416):
            with contextlib.suppress(HTTPError):
                await response.read_all(PROBE_ERROR_BODY)
            await response.aclose()
            self.host.probe_refused()
            log.info("%s: %s refused 3 ranges in one request (%d); single ranges", self.what, host, status)
            return
        parts = ByteMap()
        try:
            await self._receive_parts(response, parts, size)
        except (MultipartError, _BadPart) as e:
            await response.abandon()
            self.host.broken_multipart()
            log.info("%s: %s answered a multi-range probe unusably (%s); single ranges", self.what, host, e)
            return
        except BaseException:
            await response.abandon()
            raise
        await response.aclose()
        if all(parts.extract(r) is not None for r in wanted):
            self.host.multipart_seen()
            log.debug("%s: %s answers multi-range requests", self.what, host)
        else:
            self.host.broken_multipart()
            log.info("%s: %s left out ranges of a multi-range probe; single ranges", self.what, host)

    # -- single ranges -------------------------------------------------------------------------------

    async def _stream_span(self, span: Span, write: Write) -> None:
        """A span from its own ranged GET, its pieces written as they come: the body is read into one buffer
        (with no copy from the socket or the TLS decryption, as GetBlob's), reused once ``write`` returned."""
        blob = await self._source.open_blob_from(self._digest, span.offset, span.end)
        cutter = SpanCutter(span)
        buffer = memoryview(bytearray(min(READ_SIZE, span.length)))
        async with blob:
            remaining = span.length
            while remaining:
                count = await blob.read_into(buffer[: min(len(buffer), remaining)])
                if not count:
                    raise SourceError(
                        f"{self.what}: the answer for bytes {span.offset}-{span.end - 1} ended {remaining} bytes early",
                        ErrorCode.RETRYABLE,
                    )
                remaining -= count
                for piece in cutter.feed(buffer[:count]):
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
            await self._receive_parts(response, parts, self.size)
        except (HTTPError, MultipartError, _BadPart) as e:
            await response.abandon()
            if not isinstance(e, HTTPError):
                self.host.broken_multipart()
            log.info("%s: multi-range answer from %s unusable (%s); fetching its ranges one by one", self.what, host, e)
        else:
            await response.aclose()
            self.host.multipart_seen()
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

    async def _receive_parts(self, response, parts: ByteMap, size: int) -> None:
        """The parts of a 206 to a multi-range request for a ``size``-byte blob, into ``parts``."""
        content_type = response.headers.get("content-type")
        limit = min(size, 2 * BATCH_MAX_BYTES)
        if not is_multipart_byteranges(content_type):
            # one part: the server coalesced everything into a single range
            got = parse_content_range(response.headers.get("content-range"))
            if got is None or (got.total is not None and got.total != size):
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
                    if got.total is not None and got.total != size:
                        raise _BadPart(f"a part of a {got.total}-byte resource, the blob has {size}")
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
