"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, placed between the daemon and a real (plain-HTTP) registry.

The daemon is pointed at ``127.0.0.1:<fault.port>`` instead of the registry. Each connection it opens gets its
own connection to the registry (opened on the first forwarded request), and both directions are parsed with
h11, so faults are scripted **per request/response exchange**::

    async with fault_proxy(registry.port) as fault:
        fault.add_rule(Stall(at=2_107_617), path=r"/blobs/sha256:", nth=1)
        ...  # drive the daemon at docker://127.0.0.1:{fault.port}/...
        assert fault.requests[-1].range == "bytes=2107617-"

A :class:`Rule` matches method + path regex (``re.search`` on the path, without the query), optionally only its
Nth match (``nth``, 1-based) and only requests with (``ranged=True``) or without (``ranged=False``) a Range
header. Every rule counts its own matches; the first rule eligible for a request applies its one action to it.

**Positions are offsets in the resource, not in the response body**: for a 206 they count from the start of
the registry's (true) Content-Range. So ``Stall(at=p)`` without ``nth`` is a resource that is stuck at ``p``
for good: a request resumed at ``p`` stalls at once. A positional action fires when the forwarded stream
reaches its offset (at the end of the body too, e.g. ``at == size``); one beyond the body never fires.

Counters and records (:attr:`FaultProxy.counters`, :attr:`~FaultProxy.requests`,
:attr:`~FaultProxy.connections`) are plain attributes; tests wait for them with :meth:`FaultProxy.wait_until`,
which wakes on every change (a request seen, body progress, a fault fired, an exchange or a connection ended).
Nothing here sleeps to synchronise: only :class:`Drip` and :class:`DelayHeaders` are timed, by definition.
Bounded: concurrent connections, records, request heads and bodies, delays; loopback only.

A connection whose first byte is not an HTTP method letter (the daemon tries TLS first: a ClientHello) is
closed at once and counted in ``counters.protocol_errors``, as a plain-HTTP server makes a TLS client give up.

**TLS mode** (``fault_proxy(port, tls=<server ssl.SSLContext>)``): the proxy terminates TLS from the client
(``trio.SSLStream``, server side, ``https_compatible=True``) and still speaks plain HTTP to the registry, so every
scripted fault reaches the client inside TLS. A completed handshake is counted in ``counters.tls_handshakes``
(and its version kept in ``ConnectionRecord.tls_version``); a failed one (a plain-HTTP client, say) in
``counters.tls_failures``, and the connection is closed. The faults keep their meaning on the wire: ``Reset`` is
an RST of the TCP connection (SO_LINGER 0 on the socket under the TLS layer), ``Close`` a FIN **without**
``close_notify`` (what a CDN cutting a connection looks like), and leaving the proxy closes connections without
``close_notify`` too.
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import ssl
import struct
import termios
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Literal

import attrs
import h11
import trio

#: the most connections open at once (more are closed at once and counted as refused)
MAX_CONNECTIONS = 64
#: the most requests recorded (more are refused: the connection is closed)
MAX_RECORDS = 10_000
#: the largest request body forwarded (pulls send none)
MAX_REQUEST_BODY = 1 << 20
#: the largest request or response head
MAX_HEAD = 64 << 10
#: bytes per read from either side
READ_SIZE = 64 << 10
#: the longest DelayHeaders or Drip interval
MAX_DELAY = 120.0
#: how long a reset waits for the bytes already sent to leave our socket (SO_LINGER 0 would drop them)
RESET_DRAIN_LIMIT = 2.0
#: the longest a client may take over the TLS handshake (TLS mode)
TLS_HANDSHAKE_LIMIT = 10.0
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def _non_negative(_: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value}")


def _delay(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= MAX_DELAY:
        raise ValueError(f"{attribute.name} must be within [0, {MAX_DELAY}] seconds, not {value}")


# ------------------------------------------------------------------------------------------------ actions


@attrs.frozen
class Stall:
    """Forward the body up to offset ``at``, then send nothing more and keep the connection open (until the
    client closes it or the proxy stops): the CDN of the seed case."""

    at: int = attrs.field(validator=_non_negative)


@attrs.frozen
class Reset:
    """Forward the body up to offset ``at``, then reset the connection (SO_LINGER 0: an RST)."""

    at: int = attrs.field(validator=_non_negative)


@attrs.frozen
class Close:
    """Forward the body up to offset ``at``, then close the connection (FIN): a short body."""

    at: int = attrs.field(validator=_non_negative)


@attrs.frozen
class Drip:
    """From offset ``at``, send ``count`` bytes (None: the rest) one at a time, ``interval`` seconds apart;
    the rest at full speed."""

    at: int = attrs.field(default=0, validator=_non_negative)
    count: int | None = None
    interval: float = attrs.field(default=1.0, validator=_delay)


@attrs.frozen
class DelayHeaders:
    """Hold the response head for ``seconds`` before sending it."""

    seconds: float = attrs.field(validator=_delay)


@attrs.frozen
class Flip:
    """XOR the byte at offset ``at`` with ``mask`` (same length, so the framing stays right)."""

    at: int = attrs.field(validator=_non_negative)
    mask: int = attrs.field(default=0xFF, validator=[attrs.validators.ge(1), attrs.validators.le(255)])


@attrs.frozen
class Answer:
    """Answer the request here, without contacting the registry (the connection stays usable)."""

    status: int = attrs.field(validator=[attrs.validators.ge(200), attrs.validators.le(599)])
    retry_after: str | None = None
    #: None: a distribution error document (``UNAVAILABLE`` / ``TOOMANYREQUESTS`` / ``UNKNOWN``)
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class StripRange:
    """Forward the request without its Range header: the registry answers 200 with the whole resource."""


@attrs.frozen
class WrongContentRange:
    """Rewrite a 206's Content-Range: start and end moved by ``start_delta``, the total by ``total_delta``, or
    the whole value replaced by ``value``. (A non-206 answer is forwarded unchanged.)"""

    start_delta: int = 0
    total_delta: int = 0
    value: str | None = None


Action = Stall | Reset | Close | Drip | DelayHeaders | Flip | Answer | StripRange | WrongContentRange
Positional = Stall | Reset | Close
Outcome = Literal[
    "pending",
    "complete",  # the whole response forwarded
    "answered",  # an Answer sent
    "stalled",  # a Stall fired; the connection was then held open
    "reset",
    "closed",  # a Close fired
    "client-closed",  # the client closed (or reset) the connection mid-exchange
    "upstream-error",  # the registry closed, reset or broke the protocol mid-exchange
]


# ------------------------------------------------------------------------------------------------ records


@attrs.define(eq=False)
class Rule:
    """One scripted fault; see the module docstring. ``matched`` counts matching requests, ``fired`` lists
    the exchanges it applied to."""

    action: Action
    method: str | None = "GET"
    path: str = ".*"
    nth: int | None = None
    ranged: bool | None = None
    matched: int = 0
    fired: list[RequestRecord] = attrs.field(factory=list)
    _pattern: re.Pattern[str] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.nth is not None and self.nth < 1:
            raise ValueError("nth counts from 1")
        self._pattern = re.compile(self.path)

    def matches(self, method: str, path: str, has_range: bool) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        if self.ranged is not None and has_range != self.ranged:
            return False
        return self._pattern.search(path) is not None


@attrs.define(eq=False)
class RequestRecord:
    """One exchange as the proxy saw it. ``headers`` as the client sent them (names lower-cased),
    ``forwarded_headers`` as sent to the registry (None when answered here)."""

    number: int
    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    rule: Rule | None = None
    forwarded_headers: list[tuple[str, str]] | None = None
    upstream_status: int | None = None
    #: what the client got: status and Content-Range (after any rewrite)
    status: int | None = None
    content_range: str | None = None
    #: the resource offset of the first body byte (a 206's Content-Range start, else 0)
    start: int = 0
    #: response-body bytes sent to the client
    body_sent: int = 0
    outcome: Outcome = "pending"
    #: trio.current_time() when the request head was complete
    received_at: float = attrs.field(factory=trio.current_time)
    fault_fired: trio.Event = attrs.field(factory=trio.Event, repr=False)
    finished: trio.Event = attrs.field(factory=trio.Event, repr=False)

    @property
    def action(self) -> Action | None:
        return self.rule.action if self.rule is not None else None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    @property
    def range(self) -> str | None:
        """The Range header the client sent."""
        return self.header("range")


@attrs.define(eq=False)
class ConnectionRecord:
    """One client connection (and its registry connection, if one was needed)."""

    number: int
    peer_port: int
    requests: list[RequestRecord] = attrs.field(factory=list)
    #: TLS mode: the protocol version once the handshake completed (None: plain HTTP, or no handshake)
    tls_version: str | None = None
    upstream_opened: bool = False
    closed_by: Literal["client", "proxy", "upstream"] | None = None
    reason: str = ""
    busy: bool = False
    closed: trio.Event = attrs.field(factory=trio.Event, repr=False)

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()


@attrs.define
class Counters:
    connections_opened: int = 0
    connections_closed: int = 0
    connections_refused: int = 0
    upstream_connections: int = 0
    protocol_errors: int = 0
    #: TLS mode: handshakes completed, and connections closed because the handshake failed or timed out
    tls_handshakes: int = 0
    tls_failures: int = 0
    requests: int = 0
    #: bytes written to the registry (request heads and bodies)
    bytes_to_upstream: int = 0
    #: bytes written to the client (response heads and bodies, forwarded or made here)
    bytes_to_client: int = 0
    #: of which response-body bytes
    body_bytes_to_client: int = 0


# ------------------------------------------------------------------------------------------------ the proxy


class _ClientGone(Exception):
    pass


class _UpstreamGone(Exception):
    pass


Disposition = Literal["keep", "close", "fin", "reset"]


@attrs.define(eq=False)
class _Link:
    #: what HTTP is spoken on: ``tcp`` itself, or the TLS stream over it
    down: trio.abc.Stream
    #: the client's TCP connection (for RST and FIN, under any TLS layer)
    tcp: trio.SocketStream
    record: ConnectionRecord
    dconn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD))
    up: trio.SocketStream | None = None
    uconn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD))
    client_eof: bool = False
    first_bytes: bool = True


class FaultProxy:
    """Use :func:`fault_proxy` to run one."""

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None
    ) -> None:
        if upstream_host not in LOOPBACK:
            raise ValueError(f"the fault proxy only forwards to loopback, not {upstream_host}")
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise TypeError("tls is a server ssl.SSLContext (or None for plain HTTP)")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        #: the server context in TLS mode, None for plain HTTP
        self.tls = tls
        self.port = 0
        self.rules: list[Rule] = []
        self.requests: list[RequestRecord] = []
        self.connections: list[ConnectionRecord] = []
        self.counters = Counters()
        self._changed = trio.Event()

    # ---------------------------------------------------------------- scripting

    def add_rule(
        self,
        action: Action,
        *,
        method: str | None = "GET",
        path: str = ".*",
        nth: int | None = None,
        ranged: bool | None = None,
    ) -> Rule:
        """Apply ``action`` to requests matching ``method`` and ``path`` (a regex searched in the path); with
        ``nth`` only to the Nth such request, with ``ranged`` only to requests with/without a Range header."""
        rule = Rule(action, method, path, nth, ranged)
        self.rules.append(rule)
        return rule

    @property
    def transport(self) -> Literal["plain", "tls"]:
        """What clients must speak to the proxy: ``"tls"`` (HTTP inside TLS) or ``"plain"`` HTTP."""
        return "plain" if self.tls is None else "tls"

    def remove_rule(self, rule: Rule) -> None:
        self.rules.remove(rule)

    def clear_rules(self) -> None:
        self.rules.clear()

    # ---------------------------------------------------------------- observing

    def requests_for(self, path: str, method: str | None = "GET") -> list[RequestRecord]:
        """Recorded requests whose path matches the regex ``path``."""
        pattern = re.compile(path)
        return [
            r
            for r in self.requests
            if pattern.search(r.path) and (method is None or r.method.upper() == method.upper())
        ]

    @property
    def open_connections(self) -> list[ConnectionRecord]:
        return [c for c in self.connections if c.is_open]

    @property
    def busy_connections(self) -> list[ConnectionRecord]:
        """Open connections in the middle of an exchange (a stalled one stays busy until the client closes)."""
        return [c for c in self.connections if c.is_open and c.busy]

    def connection(self, number: int) -> ConnectionRecord:
        return self.connections[number - 1]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Return once ``predicate()`` holds; it is checked again after every change. ``timeout`` is a hang
        guard (trio.TooSlowError)."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait until every exchange seen so far has finished (a stalled one: once its client closed)."""
        await self.wait_until(lambda: all(r.finished.is_set() for r in self.requests), timeout)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---------------------------------------------------------------- connections

    async def _handle(self, tcp: trio.SocketStream) -> None:
        if len(self.open_connections) >= MAX_CONNECTIONS or len(self.connections) >= MAX_RECORDS:
            self.counters.connections_refused += 1
            await trio.aclose_forcefully(tcp)
            return
        record = ConnectionRecord(len(self.connections) + 1, tcp.socket.getpeername()[1])
        self.connections.append(record)
        self.counters.connections_opened += 1
        down: trio.abc.Stream = tcp
        if self.tls is not None:
            # https_compatible: aclose never sends close_notify (a Close or the proxy stopping cuts the TCP
            # connection under TLS), and a client leaving without close_notify is an EOF, not an error
            down = trio.SSLStream(tcp, self.tls, server_side=True, https_compatible=True)
        link = _Link(down, tcp, record)
        self._notify()
        try:
            if isinstance(down, trio.SSLStream) and not await self._tls_handshake(down, record):
                return
            await self._serve(link)
        except h11.ProtocolError as e:
            record.closed_by = record.closed_by or "proxy"
            record.reason = record.reason or f"client protocol error: {e}"
            self.counters.protocol_errors += 1
        except _ClientGone as e:
            record.closed_by, record.reason = "client", str(e) or "client closed"
        except _UpstreamGone as e:
            record.closed_by, record.reason = "upstream", str(e) or "registry closed"
        finally:
            if link.up is not None:
                await trio.aclose_forcefully(link.up)
            await trio.aclose_forcefully(link.down)
            if record.closed_by is None:
                record.closed_by = "proxy"
            record.busy = False
            record.closed.set()
            self.counters.connections_closed += 1
            self._notify()

    async def _tls_handshake(self, down: trio.SSLStream[trio.SocketStream], record: ConnectionRecord) -> bool:
        """Complete the server side of the handshake (bounded); False, counted and recorded, if it failed."""
        failure = f"no TLS handshake within {TLS_HANDSHAKE_LIMIT} s"
        with trio.move_on_after(TLS_HANDSHAKE_LIMIT):
            try:
                await down.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                failure = f"TLS handshake failed: {e.__cause__ or e!r}"
            else:
                record.tls_version = down.version()
                self.counters.tls_handshakes += 1
                self._notify()
                return True
        record.closed_by, record.reason = "proxy", failure
        self.counters.tls_failures += 1
        return False

    async def _serve(self, link: _Link) -> None:
        while True:
            request = await self._read_request(link)
            if request is None:
                link.record.closed_by, link.record.reason = "client", "client closed between requests"
                return
            if len(self.requests) >= MAX_RECORDS:
                link.record.reason = "too many requests recorded"
                return
            head, body = request
            record = self._record(link, head)
            link.record.busy = True
            try:
                disposition = await self._exchange(link, record, head, body)
            finally:
                link.record.busy = False
                record.finished.set()
                self._notify()
            if disposition != "keep":
                await self._finish(link, disposition)
                return
            upstream_used = link.up is not None and link.uconn.our_state is not h11.IDLE
            if not _cycle_done(link.dconn) or (upstream_used and not _cycle_done(link.uconn)):
                link.record.reason = "not keep-alive"
                return
            link.dconn.start_next_cycle()
            if upstream_used:
                link.uconn.start_next_cycle()

    async def _finish(self, link: _Link, disposition: Disposition) -> None:
        record = link.record
        if link.client_eof:
            record.closed_by, record.reason = "client", "client closed mid-exchange"
        elif disposition == "reset":
            record.reason = "reset (fault)"
            await _drain_send_queue(link.tcp)
            # closing the socket (the caller does, TLS layer or not) now sends an RST
            link.tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif disposition == "fin":
            record.reason = "closed (fault)"
            # a FIN on the TCP connection itself: under TLS, no close_notify comes before it
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await link.tcp.send_eof()

    def _record(self, link: _Link, head: h11.Request) -> RequestRecord:
        self.counters.requests += 1
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers]
        record = RequestRecord(
            number=len(self.requests) + 1,
            connection=link.record.number,
            method=head.method.decode("ascii"),
            target=head.target.decode("latin-1"),
            headers=headers,
        )
        has_range = record.range is not None
        for rule in self.rules:
            if rule.matches(record.method, record.path, has_range):
                rule.matched += 1
                if record.rule is None and (rule.nth is None or rule.nth == rule.matched):
                    record.rule = rule
                    rule.fired.append(record)
        self.requests.append(record)
        link.record.requests.append(record)
        self._notify()
        return record

    async def _read_request(self, link: _Link) -> tuple[h11.Request, bytes] | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = link.dconn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await link.down.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    raise _ClientGone(f"client connection failed: {e}") from None
                if link.first_bytes and data:
                    link.first_bytes = False
                    if data[0] not in _METHOD_START:
                        raise h11.RemoteProtocolError(f"not HTTP/1.1 (first byte 0x{data[0]:02x}: TLS?)")
                link.dconn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BODY:
                    raise h11.RemoteProtocolError("request body too large for the fault proxy")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return head, bytes(body)
            else:  # ConnectionClosed (or PAUSED, which a finished cycle never leaves)
                return None

    # ---------------------------------------------------------------- one exchange

    async def _exchange(self, link: _Link, record: RequestRecord, head: h11.Request, body: bytes) -> Disposition:
        action = record.action
        if isinstance(action, Answer):
            try:
                await self._answer(link, record, action)
            except _ClientGone:
                link.client_eof = True
                return "close"
            return "keep"
        disposition: Disposition = "close"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, link, nursery.cancel_scope)
            try:
                disposition = await self._forward(link, record, head, body)
            except _ClientGone:
                link.client_eof = True
            except _UpstreamGone as e:
                record.outcome = "upstream-error"
                link.record.closed_by, link.record.reason = "upstream", str(e)
            nursery.cancel_scope.cancel()
        if link.client_eof:
            if record.outcome == "pending":
                record.outcome = "client-closed"
            return "close"
        return disposition

    async def _watch_client(self, link: _Link, scope: trio.CancelScope) -> None:
        """While a response is sent, notice the client closing (a pipelined request is kept in h11)."""
        try:
            while data := await link.down.receive_some(READ_SIZE):
                link.dconn.receive_data(data)
                buffered, _ = link.dconn.trailing_data
                if len(buffered) > MAX_HEAD:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        link.client_eof = True
        scope.cancel()

    async def _answer(self, link: _Link, record: RequestRecord, action: Answer) -> None:
        body = action.body if action.body is not None else _error_document(action.status)
        headers = [("Content-Type", "application/json" if action.body is None else "text/plain")]
        headers += [("Content-Length", str(len(body)))]
        if action.retry_after is not None:
            headers.append(("Retry-After", action.retry_after))
        headers += list(action.headers)
        data = link.dconn.send(h11.Response(status_code=action.status, headers=headers)) or b""
        if body and record.method != "HEAD":
            data += link.dconn.send(h11.Data(data=body)) or b""
        data += link.dconn.send(h11.EndOfMessage()) or b""
        record.status = action.status
        record.outcome = "answered"
        record.fault_fired.set()
        await self._to_client(link, data)

    async def _forward(self, link: _Link, record: RequestRecord, head: h11.Request, body: bytes) -> Disposition:
        action = record.action
        headers = [(k, v) for k, v in head.headers]
        if isinstance(action, StripRange):
            headers = [(k, v) for k, v in headers if k.lower() != b"range"]
            record.fault_fired.set()
        record.forwarded_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        if link.up is None:
            try:
                link.up = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
            except OSError as e:
                raise _UpstreamGone(f"cannot reach the registry: {e}") from None
            link.record.upstream_opened = True
            self.counters.upstream_connections += 1
        request = h11.Request(method=head.method, target=head.target, headers=headers)
        data = link.uconn.send(request) or b""
        if body:
            data += link.uconn.send(h11.Data(data=body)) or b""
        data += link.uconn.send(h11.EndOfMessage()) or b""
        await self._to_upstream(link, data)

        response = await self._next_upstream_event(link)
        while isinstance(response, h11.InformationalResponse):
            response = await self._next_upstream_event(link)
        if not isinstance(response, h11.Response):
            raise _UpstreamGone(f"unexpected event from the registry: {response!r}")
        record.upstream_status = response.status_code
        out_headers = [(k, v) for k, v in response.headers]
        content_range = _header(out_headers, b"content-range")
        if response.status_code == 206 and content_range is not None:
            parsed = _CONTENT_RANGE.match(content_range)
            record.start = int(parsed.group(1)) if parsed else 0
            if isinstance(action, WrongContentRange):
                content_range = _wrong_content_range(content_range, action)
                out_headers = [(k, v) for k, v in out_headers if k != b"content-range"]
                out_headers.append((b"content-range", content_range.encode("latin-1")))
                record.fault_fired.set()
        record.content_range = content_range
        if isinstance(action, DelayHeaders):
            record.fault_fired.set()
            self._notify()
            await trio.sleep(action.seconds)
        record.status = response.status_code
        out = h11.Response(status_code=response.status_code, headers=out_headers, reason=response.reason)
        await self._to_client(link, link.dconn.send(out) or b"")
        self._notify()

        position = record.start
        while True:
            event = await self._next_upstream_event(link)
            if isinstance(event, h11.Data):
                chunk = bytes(event.data)
                fired = await self._body_chunk(link, record, chunk, position)
                if fired is not None:
                    return fired
                position += len(chunk)
            elif isinstance(event, h11.EndOfMessage):
                if isinstance(action, Positional) and action.at <= position:
                    return await self._fire(link, record, action)
                record.outcome = "complete"  # every body byte is out (a chunked terminator may follow)
                await self._to_client(link, link.dconn.send(h11.EndOfMessage()) or b"")
                return "keep"
            else:
                raise _UpstreamGone(f"unexpected event from the registry: {event!r}")

    async def _body_chunk(self, link: _Link, record: RequestRecord, chunk: bytes, position: int) -> Disposition | None:
        """Forward one chunk starting at resource offset ``position``; a positional fault's disposition if one
        fired."""
        action = record.action
        end = position + len(chunk)
        if isinstance(action, Positional) and end > action.at:
            await self._send_body(link, record, chunk[: max(0, action.at - position)])
            return await self._fire(link, record, action)
        if isinstance(action, Flip) and position <= action.at < end:
            flipped = bytearray(chunk)
            flipped[action.at - position] ^= action.mask
            chunk = bytes(flipped)
            record.fault_fired.set()
        if isinstance(action, Drip):
            low = max(position, action.at)
            high = end if action.count is None else min(end, action.at + action.count)
            if low < high:
                record.fault_fired.set()
                await self._send_body(link, record, chunk[: low - position])
                for offset in range(low - position, high - position):
                    await trio.sleep(action.interval)
                    await self._send_body(link, record, chunk[offset : offset + 1])
                chunk = chunk[high - position :]
        await self._send_body(link, record, chunk)
        return None

    async def _fire(self, link: _Link, record: RequestRecord, action: Positional) -> Disposition:
        record.fault_fired.set()
        if isinstance(action, Stall):
            record.outcome = "stalled"
            self._notify()
            await trio.sleep_forever()  # until the client closes the connection or the proxy stops
        record.outcome = "reset" if isinstance(action, Reset) else "closed"
        return "reset" if isinstance(action, Reset) else "fin"

    async def _send_body(self, link: _Link, record: RequestRecord, data: bytes) -> None:
        if not data:
            return
        await self._to_client(link, link.dconn.send(h11.Data(data=data)) or b"")
        record.body_sent += len(data)
        self.counters.body_bytes_to_client += len(data)
        self._notify()

    async def _next_upstream_event(self, link: _Link) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        assert link.up is not None
        while True:
            try:
                event = link.uconn.next_event()
            except h11.RemoteProtocolError as e:
                raise _UpstreamGone(f"registry broke HTTP/1.1: {e}") from None
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise _UpstreamGone("the registry closed the connection")
                return event
            try:
                data = await link.up.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise _UpstreamGone(f"registry connection failed: {e}") from None
            link.uconn.receive_data(data)

    async def _to_client(self, link: _Link, data: bytes) -> None:
        try:
            await link.down.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise _ClientGone(f"client connection failed: {e}") from None
        self.counters.bytes_to_client += len(data)

    async def _to_upstream(self, link: _Link, data: bytes) -> None:
        assert link.up is not None
        try:
            await link.up.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise _UpstreamGone(f"registry connection failed: {e}") from None
        self.counters.bytes_to_upstream += len(data)


def _cycle_done(conn: h11.Connection) -> bool:
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)


def _wrong_content_range(value: str, action: WrongContentRange) -> str:
    if action.value is not None:
        return action.value
    parsed = _CONTENT_RANGE.match(value)
    if parsed is None:
        return value
    start, end, total = int(parsed.group(1)), int(parsed.group(2)), parsed.group(3)
    if total != "*":
        total = str(int(total) + action.total_delta)
    return f"bytes {start + action.start_delta}-{end + action.start_delta}/{total}"


def _error_document(status: int) -> bytes:
    code = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}.get(status, "UNKNOWN")
    return json.dumps({"errors": [{"code": code, "message": f"injected {status}", "detail": None}]}).encode()


async def _drain_send_queue(stream: trio.SocketStream) -> None:
    """Wait (bounded) until what we sent left our socket, so SO_LINGER 0 does not drop it: "RST after N bytes"
    means N bytes sent first. Polls the kernel's queue (not a synchronisation with any task)."""
    buffer = bytearray(4)
    with trio.move_on_after(RESET_DRAIN_LIMIT):
        while True:
            try:
                fcntl.ioctl(stream.socket.fileno(), termios.TIOCOUTQ, buffer)
            except OSError:
                return
            if struct.unpack("i", buffer)[0] == 0:
                return
            await trio.sleep(0.005)


@asynccontextmanager
async def fault_proxy(
    upstream_port: int, upstream_host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` on 127.0.0.1 (an ephemeral port) in front of ``upstream_host:upstream_port``,
    for the duration of the block; with ``tls`` (a server context) clients must speak HTTPS to it. Leaving the
    block closes every connection, stalled ones included."""
    proxy = FaultProxy(upstream_port, upstream_host, tls=tls)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


__all__ = [
    "Action",
    "Answer",
    "Close",
    "ConnectionRecord",
    "Counters",
    "DelayHeaders",
    "Drip",
    "FaultProxy",
    "Flip",
    "RequestRecord",
    "Reset",
    "Rule",
    "Stall",
    "StripRange",
    "WrongContentRange",
    "fault_proxy",
]
