"""A scriptable HTTP/1.1 test server on 127.0.0.1 (trio + h11), and a tiny CONNECT proxy.

Each request is answered by the next :class:`Reply` queued for its path (the last one repeats), so a test says
exactly what the client sees: status, headers, body, a stall or a close after N body bytes, an LF-only head,
no answer at all, keep-alive on or off. A ``gate`` may answer a request before its route does (an auth check:
a 401 unless the right ``Authorization`` came). The server records every request, every accepted connection,
and every byte it received (``received``: what a test asserts a secret never reached).

Nothing here sleeps to synchronise: a "stall" parks the handler until the test's nursery is cancelled.
"""

from __future__ import annotations

import functools
import itertools
import socket
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import trio

from proxy.http.timeouts import Timeouts

#: deadlines for client tests: short so failure paths are quick, long enough for a loaded 2-core CI machine
FAST = Timeouts(connect=5, tls=5, headers=5, stall=5)


@attrs.define
class Reply:
    """What to answer to one request."""

    status: int = 200
    headers: list[tuple[str, str]] = attrs.Factory(list)
    body: bytes = b""
    #: send Content-Length (else: chunked, or read-until-close when keep_alive is False)
    content_length: bool = True
    #: send this many body bytes, then keep the connection open and silent
    stall_after: int | None = None
    #: send this many body bytes, then close the connection (FIN)
    close_after: int | None = None
    #: send this many body bytes, then reset the connection (RST)
    reset_after: int | None = None
    #: never answer; keep the connection open
    no_response: bool = False
    #: close the connection without answering
    drop: bool = False
    #: write the status line and headers with bare LF line ends
    lf_only: bool = False
    #: False: "Connection: close", and close after the response
    keep_alive: bool = True
    #: answer as if keeping the connection alive, then close it (a server dropping an idle connection)
    close_after_response: bool = False


@attrs.frozen
class Recorded:
    """A request as the server saw it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # 1-based number of the connection it came on


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status=status, headers=[("Location", location)], body=b"redirecting\n")


class TestServer:
    """Serve scripted replies. Use :func:`serve` to run one."""

    __test__ = False  # not a pytest test class

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self.requests: list[Recorded] = []
        self.connections = 0
        #: every byte read from every connection, in order (after TLS decryption)
        self.received = bytearray()
        #: called with each request before routing: a Reply answers it instead of the route (None: route it)
        self.gate: Callable[[Recorded], Reply | None] | None = None
        self._routes: dict[str, list[Reply]] = {}
        self._ids = itertools.count(1)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def route(self, path: str, *replies: Reply) -> None:
        """Answer requests for ``path`` with ``replies`` in turn; the last one repeats."""
        self._routes[path] = list(replies)

    def requested(self, path: str) -> list[Recorded]:
        """The requests for ``path`` (any query)."""
        return [r for r in self.requests if urllib.parse.urlsplit(r.target).path == path]

    def _reply_for(self, target: str) -> Reply:
        path = urllib.parse.urlsplit(target).path if "://" in target else target.split("?")[0]
        replies = self._routes.get(path)
        if not replies:
            return Reply(status=404, body=b"not found\n")
        return replies.pop(0) if len(replies) > 1 else replies[0]

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _next_request(stream, conn, self.received)
                if request is None:
                    return
                event, body = request
                recorded = Recorded(
                    method=event.method.decode(),
                    target=event.target.decode(),
                    headers={k.decode().lower(): v.decode() for k, v in event.headers},
                    body=body,
                    connection=number,
                )
                self.requests.append(recorded)
                reply = (self.gate(recorded) if self.gate is not None else None) or self._reply_for(recorded.target)
                if not await self._respond(stream, conn, reply, head_only=recorded.method == "HEAD"):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply, head_only: bool) -> bool:
        """Send ``reply``; False when the connection must end now."""
        if reply.no_response:
            await trio.sleep_forever()
        if reply.drop:
            return False
        headers = list(reply.headers)
        if not reply.keep_alive:
            headers.append(("Connection", "close"))
        if reply.content_length:
            headers.append(("Content-Length", str(len(reply.body))))
        elif reply.keep_alive:
            headers.append(("Transfer-Encoding", "chunked"))
        head = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if reply.lf_only:
            head = head.replace(b"\r\n", b"\n")
        await stream.send_all(head)
        body = b"" if head_only else reply.body
        cut = _first_not_none(reply.stall_after, reply.close_after, reply.reset_after)
        if cut is not None:
            if body[:cut]:
                await stream.send_all(conn.send(h11.Data(data=body[:cut])) or b"")
            if reply.stall_after is not None:
                await trio.sleep_forever()
            if reply.reset_after is not None:
                _set_linger_zero(stream)
            return False
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return reply.keep_alive and not reply.close_after_response


def _first_not_none(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _set_linger_zero(stream: trio.abc.Stream) -> None:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _next_request(
    stream: trio.abc.Stream, conn: h11.Connection, sink: bytearray | None = None
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body (None when the client closed); every byte read is appended to ``sink``."""
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if sink is not None:
                sink += data
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


@asynccontextmanager
async def serve_on_loopback(
    handler: Callable[[trio.abc.Stream], Awaitable[None]], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Serve ``handler`` on 127.0.0.1 (an ephemeral port, TLS with ``ssl_context``) for the duration of the
    block, which gets the port."""
    raw = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(raw)
    if ssl_context is not None:
        listeners = [trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in raw]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        try:
            yield _port(raw[0])
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[TestServer]:
    """Run a :class:`TestServer` on 127.0.0.1 (an ephemeral port) for the duration of the block."""
    server = TestServer(ssl_context)
    async with serve_on_loopback(server._handle, ssl_context) as port:
        server.port = port
        yield server


def _port(listener: trio.SocketListener) -> int:
    return listener.socket.getsockname()[1]


class TunnelProxy:
    """A CONNECT-only HTTP proxy: records targets, then splices bytes both ways."""

    __test__ = False

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.port = 0
        self.targets: list[str] = []
        self.authorizations: list[str | None] = []

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request = await _next_request(client, conn)
            if request is None:
                return
            event, _ = request
            target = event.target.decode()
            self.targets.append(target)
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            self.authorizations.append(headers.get("proxy-authorization"))
            if event.method != b"CONNECT" or self.status != 200:
                status = 405 if event.method != b"CONNECT" else self.status
                response = h11.Response(status_code=status, headers=[("Content-Length", "0"), ("Connection", "close")])
                await client.send_all((conn.send(response) or b"") + (conn.send(h11.EndOfMessage()) or b""))
                return
            host, _, port = target.rpartition(":")
            upstream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            await client.send_all(conn.send(h11.Response(status_code=200, headers=[])) or b"")
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_splice, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_splice, upstream, client, nursery.cancel_scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(client)


async def _splice(source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


@asynccontextmanager
async def serve_proxy(status: int = 200) -> AsyncIterator[TunnelProxy]:
    """Run a :class:`TunnelProxy` on 127.0.0.1 for the duration of the block."""
    proxy = TunnelProxy(status)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = _port(listeners[0])
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
