"""One HTTP/1.1 connection: a trio stream plus an ``h11.Connection``.

h11 owns the protocol state (framing, keep-alive, what may come next); this module owns the I/O and the
deadlines. Every wait on the network has a deadline:

- connect: :func:`open_connection` (DNS + TCP, and the proxy's CONNECT answer),
- tls: the TLS handshake,
- headers: from sending the request to the end of the response headers,
- stall: each body read separately, so a transfer that keeps moving never times out and a silent one always does.

A connection may carry another request only when the previous response body was read to its end and h11 says
both sides are DONE with keep-alive (:attr:`Connection.reusable`). Anything else (an error, a cancelled request,
a body nobody wants) ends the connection.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import h11
import trio

from .errors import (
    BodyTooLarge,
    ConnectError,
    ConnectionLost,
    HTTPTimeoutError,
    Phase,
    ProtocolError,
    StallError,
    TLSError,
)
from .headers import HeaderInput, Headers, has, header_pairs
from .proxies import ProxyURL, open_tunnel
from .timeouts import Timeouts
from .tls_stream import TLSStream, open_tls
from .url import Origin

#: bytes asked from the socket per read
READ_SIZE = 1 << 20
#: bodies at least this long (by Content-Length) are read past h11 (see Connection._wants_raw_body)
RAW_BODY_MIN = 1 << 20
#: the largest response head (status line + headers) we accept
MAX_HEAD_SIZE = 256 * 1024

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})

T = TypeVar("T")


class Connection:
    """An HTTP/1.1 connection to ``host:port``; one request at a time."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        host: str,
        port: int,
        timeouts: Timeouts,
        *,
        authority: str | None = None,
        absolute_form: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.timeouts = timeouts
        #: default Host header
        self.authority = authority or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        #: requests go to an HTTP proxy, so targets must be absolute URLs
        self.absolute_form = absolute_form
        #: how many requests this connection has carried
        self.requests_sent = 0
        #: trio.current_time() when the connection last became idle
        self.idle_since = 0.0
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        self._closed = False
        self._broken = False  # an exchange failed or was interrupted: never reuse
        self._eof = False
        self._response: Response | None = None
        self._received_in_cycle = 0  # bytes from the network since the current request was sent
        self._pending = b""  # body bytes h11 handed us that the caller has not taken yet
        self._body_received = 0
        self._expected: int | None = None
        self._raw_remaining: int | None = None  # body bytes still to read past h11 (see _wants_raw_body)
        self._method = ""

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reusable(self) -> bool:
        """True when another request may be sent: the last exchange completed and both sides keep-alive."""
        return (
            not self._closed
            and not self._broken
            and self._response is None
            and self._h11.our_state is h11.IDLE
            and self._h11.their_state is h11.IDLE
        )

    @property
    def received_in_cycle(self) -> int:
        """Bytes received since the current request was sent (0: the server never answered)."""
        return self._received_in_cycle

    def is_readable(self) -> bool:
        """True if the socket has data or EOF waiting. On an idle connection that means the server closed it
        (or sent something unsolicited, such as a 408): either way it must not be reused."""
        sock = _raw_socket(self._stream)
        if sock is None:
            return False
        fileno = sock.fileno()
        if fileno < 0:
            return True
        poller = select.poll()
        poller.register(fileno, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

    # -- request -------------------------------------------------------------------------------------------

    async def request(self, method: str, target: str, headers: HeaderInput = (), body: bytes = b"") -> Response:
        """Send a request and wait for the response head (deadline: ``timeouts.headers``).

        The returned :class:`Response` must be read to its end, or closed, before the next request.
        """
        if self._closed:
            raise RuntimeError("connection is closed")
        if not self.reusable:
            raise RuntimeError("connection is busy or unusable")
        pairs = header_pairs(headers)
        if not has(pairs, "host"):
            pairs.insert(0, ("Host", self.authority))
        if (body or method.upper() in _METHODS_WITH_BODY) and not has(pairs, "content-length"):
            pairs.append(("Content-Length", str(len(body))))
        try:
            data = self._h11.send(h11.Request(method=method, target=target, headers=pairs)) or b""
            if body:
                data += self._h11.send(h11.Data(data=body)) or b""
            data += self._h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as e:
            self._broken = True
            raise ProtocolError(self.host, self.port, Phase.HEADERS, e) from e
        self.requests_sent += 1
        self._received_in_cycle = 0
        self._body_received = 0
        self._expected = None
        self._raw_remaining = None
        self._method = method.upper()
        try:
            with trio.move_on_after(self.timeouts.headers):
                response = await self._send_and_receive_head(data)
                self._response = response
                return response
            raise HTTPTimeoutError(self.host, self.port, Phase.HEADERS, self.timeouts.headers)
        except BaseException:
            self._broken = True
            raise

    async def _send_and_receive_head(self, data: bytes) -> Response:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as e:
            raise ConnectionLost(self.host, self.port, Phase.HEADERS, e.__cause__ or e) from e
        while True:
            event = self._next_event(Phase.HEADERS)
            if event is h11.NEED_DATA:
                await self._receive(Phase.HEADERS)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                response = Response(
                    self,
                    status=event.status_code,
                    reason=event.reason.decode("latin-1"),
                    headers=Headers.from_h11(event.headers),
                    http_version=event.http_version.decode("ascii"),
                )
                self._expected = response.content_length
                return response
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionLost(self.host, self.port, Phase.HEADERS, EOFError("server closed the connection"))
            else:  # pragma: no cover - h11 does not produce anything else for a client here
                raise ProtocolError(self.host, self.port, Phase.HEADERS, ValueError(f"unexpected {event!r}"))

    # -- body ----------------------------------------------------------------------------------------------

    async def _read_body(self, max_bytes: int) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            return chunk
        if self._response is None or self._response.complete:
            return b""
        try:
            if self._raw_remaining is None and self._wants_raw_body():
                self._enter_raw_body()
                if self._pending:
                    chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
                    return chunk
            if self._raw_remaining is not None:
                return await self._read_raw_body(max_bytes)
            while True:
                event = self._next_event(Phase.BODY)
                if event is h11.NEED_DATA:
                    with trio.move_on_after(self.timeouts.stall):
                        await self._receive(Phase.BODY)
                        continue
                    raise StallError(self.host, self.port, self.timeouts.stall, self._body_received, self._expected)
                if isinstance(event, h11.Data):
                    if not event.data:
                        continue
                    data = bytes(event.data)
                    self._body_received += len(data)
                    chunk, self._pending = data[:max_bytes], data[max_bytes:]
                    return chunk
                if isinstance(event, h11.EndOfMessage):
                    self._finish_cycle()
                    return b""
                if isinstance(event, h11.ConnectionClosed):
                    raise ConnectionLost(
                        self.host, self.port, Phase.BODY, received=self._body_received, expected=self._expected
                    )
                raise ProtocolError(self.host, self.port, Phase.BODY, ValueError(f"unexpected {event!r}"))
        except BaseException:
            self._broken = True
            raise

    # -- large bodies, past h11 ------------------------------------------------------------------------------

    def _wants_raw_body(self) -> bool:
        """A long body of known length is read straight from the socket: h11 would copy every byte twice
        more. h11 then never sees the body, so the connection is closed after it, never reused."""
        return (
            self._expected is not None
            and self._method != "HEAD"
            and self._response is not None
            and self._response.status not in (204, 304)
            and self._expected - self._body_received >= RAW_BODY_MIN
            and self._h11.their_state is h11.SEND_BODY
        )

    def _enter_raw_body(self) -> None:
        """Take the body bytes h11 already buffered, then count down the rest ourselves."""
        assert self._expected is not None
        while True:
            event = self._next_event(Phase.BODY)
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                self._body_received += len(data)
                self._pending += data
                continue
            if event is h11.NEED_DATA:
                break
            raise ProtocolError(self.host, self.port, Phase.BODY, ValueError(f"unexpected {event!r}"))
        self._raw_remaining = self._expected - self._body_received

    async def _read_raw_body(self, max_bytes: int) -> bytes:
        if self._raw_body_ended():
            return b""
        return await self._receive_raw(self._stream.receive_some, min(max_bytes, READ_SIZE), len)

    async def _read_raw_body_into(self, buffer: memoryview) -> int:
        if self._raw_body_ended():
            return 0
        return await self._receive_raw(lambda n: receive_into(self._stream, buffer[:n]), len(buffer), int)

    def _raw_body_ended(self) -> bool:
        assert self._raw_remaining is not None and self._response is not None
        if self._raw_remaining:
            return False
        self._response.complete = True
        self._broken = True  # h11 did not see the body: this connection cannot carry another request
        return True

    async def _receive_raw(self, receive: Callable[[int], Awaitable[T]], limit: int, count: Callable[[T], int]) -> T:
        """One read of at most ``limit`` of the body bytes still to come, past h11, within the stall deadline."""
        assert self._raw_remaining is not None
        with trio.move_on_after(self.timeouts.stall):
            try:
                result = await receive(min(limit, self._raw_remaining))
            except trio.BrokenResourceError as e:
                raise ConnectionLost(
                    self.host,
                    self.port,
                    Phase.BODY,
                    e.__cause__ or e,
                    received=self._body_received,
                    expected=self._expected,
                ) from e
            got = count(result)
            if not got:
                raise ConnectionLost(
                    self.host, self.port, Phase.BODY, received=self._body_received, expected=self._expected
                )
            self._raw_remaining -= got
            self._body_received += got
            self._received_in_cycle += got
            return result
        raise StallError(self.host, self.port, self.timeouts.stall, self._body_received, self._expected)

    async def _read_body_into(self, buffer: memoryview) -> int:
        """Body bytes into ``buffer`` (0 at the end): a long body straight from the socket (or the TLS stream's
        decryption) into it, anything else through :meth:`_read_body`."""
        if not self._pending and self._response is not None and not self._response.complete:
            try:
                if self._raw_remaining is None and self._wants_raw_body():
                    self._enter_raw_body()
                if self._raw_remaining is not None and not self._pending:
                    return await self._read_raw_body_into(buffer)
            except BaseException:
                self._broken = True
                raise
        chunk = await self._read_body(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def _poll_body_end(self) -> bool:
        """Without any I/O: is the body complete? (HEAD, 204, Content-Length: 0, or all of it already read.)"""
        response = self._response
        if response is None or response.complete:
            return True
        if self._pending or self._broken:
            return False
        try:
            while True:
                event = self._h11.next_event()
                if isinstance(event, h11.Data):
                    if not event.data:
                        continue
                    self._pending = bytes(event.data)
                    self._body_received += len(self._pending)
                    return False
                if isinstance(event, h11.EndOfMessage):
                    self._finish_cycle()
                    return True
                return False
        except h11.RemoteProtocolError:
            self._broken = True
            return False

    def _finish_cycle(self) -> None:
        response = self._response
        assert response is not None
        response.complete = True
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        if self._h11.trailing_data[0]:
            # Bytes after the end of the response (a body longer than its Content-Length, or an unsolicited
            # response): never parse them as the answer to our next request on this connection.
            self._broken = True

    def _response_done(self) -> None:
        """The caller is finished with the response (whether or not the body was read)."""
        if not self._poll_body_end():
            self._broken = True
        self._response = None
        self.idle_since = trio.current_time()

    # -- I/O helpers ---------------------------------------------------------------------------------------

    def _next_event(self, phase: Phase) -> object:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as e:
            if self._eof:
                raise ConnectionLost(
                    self.host, self.port, phase, e, received=self._body_received, expected=self._expected
                ) from e
            raise ProtocolError(self.host, self.port, phase, e) from e

    async def _receive(self, phase: Phase) -> None:
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except trio.BrokenResourceError as e:
            raise ConnectionLost(
                self.host, self.port, phase, e.__cause__ or e, received=self._body_received, expected=self._expected
            ) from e
        self._received_in_cycle += len(data)
        if not data:
            self._eof = True
        self._h11.receive_data(data)

    # -- closing -------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection. Never blocks on the network (no TLS close_notify round trip)."""
        await self.abandon()

    async def abandon(self) -> None:
        """Close the socket at once, without draining whatever body is still coming."""
        if self._closed:
            return
        self._closed = True
        self._broken = True
        await trio.aclose_forcefully(self._stream)


class Response:
    """A response head, plus a reader for its body. Use :meth:`read_some` / :meth:`read_all`, then
    :meth:`aclose` (or ``async with``); :meth:`abandon` when the rest of the body is unwanted."""

    def __init__(self, connection: Connection, *, status: int, reason: str, headers: Headers, http_version: str):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http_version = http_version
        #: the URL this response answers (set by the pool)
        self.url = ""
        #: URLs that redirected to :attr:`url`, oldest first (set by the redirect follower)
        self.history: tuple[str, ...] = ()
        #: the whole body has been received
        self.complete = False
        self._connection = connection
        self._released = False
        self._on_release: Callable[[Response], Awaitable[None]] | None = None

    @property
    def connection(self) -> Connection:
        return self._connection

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None or "transfer-encoding" in self.headers:
            return None
        try:
            return int(value.split(",")[0].strip())
        except ValueError:
            return None

    @property
    def received(self) -> int:
        """Body bytes received so far."""
        return self._connection._body_received

    async def read_some(self, max_bytes: int = READ_SIZE) -> bytes:
        """Up to ``max_bytes`` body bytes; ``b""`` at the end of the body. Each call waits at most
        ``timeouts.stall`` for the next byte (:class:`StallError`)."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._released:
            raise RuntimeError("response already closed")
        return await self._connection._read_body(max_bytes)

    async def read_into(self, buffer: memoryview) -> int:
        """Body bytes into ``buffer``, as many as are there (at least one), without an intermediate copy for a
        long body; 0 at the end of the body. The same deadline and errors as :meth:`read_some`."""
        if not len(buffer):
            raise ValueError("the buffer must not be empty")
        if self._released:
            raise RuntimeError("response already closed")
        return await self._connection._read_body_into(buffer)

    async def read_all(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (:class:`BodyTooLarge` beyond; the connection is then
        unusable and is closed when the response is)."""
        declared = self.content_length
        if declared is not None and declared > limit:
            self._connection._broken = True
            raise BodyTooLarge(self._connection.host, self._connection.port, limit, declared)
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read_some(READ_SIZE):
            size += len(chunk)
            if size > limit:
                self._connection._broken = True
                raise BodyTooLarge(self._connection.host, self._connection.port, limit)
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Done with this response. The connection goes back to its pool when the body was read to the end
        and both sides keep-alive; otherwise it is closed."""
        if self._released:
            return
        self._released = True
        self._connection._response_done()
        if self._on_release is not None:
            await self._on_release(self)
        elif not self._connection.reusable:
            await self._connection.abandon()

    async def abandon(self) -> None:
        """Done with this response, and close its connection without reading the rest of the body."""
        await self._connection.abandon()
        await self.aclose()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            await self.abandon()
        else:
            await self.aclose()

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason!r} from {self.url or self._connection.authority}>"


async def receive_into(stream: trio.abc.Stream, buffer: memoryview) -> int:
    """``stream.receive_some`` into ``buffer`` (0 at the end of the stream): without a copy for our TLS stream
    and for a plain socket; errors as ``receive_some`` raises them."""
    if isinstance(stream, TLSStream):
        return await stream.receive_into(buffer)
    if isinstance(stream, trio.SocketStream):
        try:
            return await stream.socket.recv_into(buffer)
        except OSError as e:
            raise trio.BrokenResourceError(e) from e
    data = await stream.receive_some(len(buffer))
    buffer[: len(data)] = data
    return len(data)


def _raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    while isinstance(stream, (trio.SSLStream, TLSStream)):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


async def open_connection(
    origin: Origin,
    timeouts: Timeouts,
    ssl_context: ssl.SSLContext | None = None,
    *,
    proxy: ProxyURL | None = None,
) -> Connection:
    """Connect to ``origin`` (directly, or through an HTTP proxy: a CONNECT tunnel for https, absolute-form
    requests for http) and do the TLS handshake for https."""
    host, port = (proxy.host, proxy.port) if proxy is not None else (origin.host, origin.port)
    via = proxy.label if proxy is not None else ""
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(timeouts.connect):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise ConnectError(origin.host, origin.port, e, via=via) from e
    if stream is None:
        detail = f" (proxy {via})" if via else ""
        raise HTTPTimeoutError(origin.host, origin.port, Phase.CONNECT, timeouts.connect, detail)
    try:
        if origin.scheme == "https":
            if proxy is not None:
                await open_tunnel(stream, origin.host, origin.port, proxy, timeouts)
            stream = await _handshake(stream, origin, timeouts, ssl_context)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Connection(
        stream,
        origin.host,
        origin.port,
        timeouts,
        authority=origin.authority,
        absolute_form=proxy is not None and origin.scheme == "http",
    )


async def _handshake(
    stream: trio.abc.Stream, origin: Origin, timeouts: Timeouts, ssl_context: ssl.SSLContext | None
) -> TLSStream:
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
    assert isinstance(stream, trio.SocketStream)
    with trio.move_on_after(timeouts.tls):
        try:
            return await open_tls(stream, ssl_context, origin.host)
        except trio.BrokenResourceError as e:
            raise TLSError(origin.host, origin.port, e.__cause__ or e) from e
    raise HTTPTimeoutError(origin.host, origin.port, Phase.TLS, timeouts.tls)
