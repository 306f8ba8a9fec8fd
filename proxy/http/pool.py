"""A pool of HTTP/1.1 connections keyed by (scheme, host, port).

- At most ``max_per_host`` requests per origin **waiting for the network**: connecting, sending, waiting for the
  response's headers. Further requests wait in FIFO order on a ``trio.Semaphore``. A slot is given back as soon
  as the headers are in: a response whose body is being read holds its own connection and nothing else. So a
  body that waits for a slow consumer (a client that does not read its pipe) never keeps another request, of
  this client or of any other, from reaching the host. Every wait that holds a slot has a deadline
  (:class:`~proxy.http.timeouts.Timeouts`); no lock is held across network I/O.
- At most ``max_per_host`` idle connections are kept per origin; more are closed when given back.
- A connection returns to the pool only when its response was read to the end and both sides keep-alive.
  Anything else (an unread body, an error, a cancellation) closes it.
- An idle connection is checked before reuse: one the server closed (readable at EOF) or kept too long is
  discarded. If an idempotent request still fails on a reused connection before any response byte arrived (the
  server closed it just as we sent), it is sent once more on a new connection.
- Proxies come from the environment (:class:`~proxy.http.proxies.ProxyConfig`).

Why bodies do not count: the per-host cap exists to bound how many connections we open at once, politely, as
browsers do. Counting bodies too would let six unread pipes (of one client, or of six clients of a daemon)
stop every other request to that host with nothing to bound the wait: the hang of skopeo#2878 moved from a
stalled CDN to a slow neighbour. Open bodies are bounded instead by what holds them: each belongs to one pipe,
and pipes are limited per connection, per user and per daemon (``proxy.server.limits``).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType

import attrs
import trio

from .connection import Connection, Response, open_connection
from .errors import ConnectionLost
from .headers import HeaderInput, has, header_pairs
from .proxies import ProxyConfig, ProxyURL
from .timeouts import Timeouts
from .tls import create_ssl_context
from .url import URL, Origin

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: called with a URL's authority as written (``host`` or ``host:port``, the certs.d directory name)
SSLContextFactory = Callable[[str], ssl.SSLContext]


@attrs.define
class PoolStats:
    """Counters, for tests and diagnostics."""

    connections_opened: int = 0
    connections_reused: int = 0
    stale_discarded: int = 0
    retried_on_new_connection: int = 0


class _Host:
    def __init__(self, limit: int) -> None:
        self.slots = trio.Semaphore(limit)
        self.idle: list[Connection] = []


class ConnectionPool:
    """Connections to many origins. Use ``async with pool.request(...) as response`` (or :meth:`send` and
    ``await response.aclose()``), and :meth:`aclose` (or ``async with pool``) at the end."""

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        ssl_context_for: SSLContextFactory | None = None,
        max_per_host: int = 6,
        *,
        proxies: ProxyConfig | None = None,
        idle_timeout: float = 90.0,
    ) -> None:
        if max_per_host < 1:
            raise ValueError("max_per_host must be >= 1")
        self.timeouts = timeouts or Timeouts()
        self.max_per_host = max_per_host
        self.idle_timeout = idle_timeout
        self.proxies = proxies if proxies is not None else ProxyConfig.from_environ()
        self.stats = PoolStats()
        self._ssl_context_for = ssl_context_for
        self._ssl_contexts: dict[str, ssl.SSLContext] = {}
        self._hosts: dict[Origin, _Host] = {}
        self._closed = False

    # -- public --------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def request(
        self, method: str, url: str | URL, headers: HeaderInput = (), body: bytes = b""
    ) -> AsyncIterator[Response]:
        """Send a request; the response is valid inside the block. On leaving it, the connection goes back to
        the pool if the body was read to the end, and is closed otherwise."""
        response = await self.send(method, url, headers, body)
        try:
            yield response
        except BaseException:
            await response.abandon()
            raise
        await response.aclose()

    async def send(self, method: str, url: str | URL, headers: HeaderInput = (), body: bytes = b"") -> Response:
        """Send a request and return the response once its headers arrived. The caller must
        ``await response.aclose()`` (or ``abandon()``), which gives the connection back (or closes it)."""
        if self._closed:
            raise RuntimeError("connection pool is closed")
        parsed = url if isinstance(url, URL) else URL.parse(url)
        host = self._hosts.get(parsed.origin)
        if host is None:
            host = self._hosts[parsed.origin] = _Host(self.max_per_host)
        async with host.slots:  # only until the headers are in: see the module docstring
            response = await self._exchange(host, parsed, method.upper(), header_pairs(headers), body)
        response.url = str(parsed)

        async def release(response: Response) -> None:
            await self._release(host, response.connection)

        response._on_release = release
        return response

    def idle_connections(self, url: str | URL) -> int:
        parsed = url if isinstance(url, URL) else URL.parse(url)
        host = self._hosts.get(parsed.origin)
        return len(host.idle) if host is not None else 0

    async def aclose(self) -> None:
        """Close every idle connection; busy ones are closed when their responses are."""
        self._closed = True
        for host in self._hosts.values():
            idle, host.idle = host.idle, []
            for conn in idle:
                await conn.aclose()

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- internals -----------------------------------------------------------------------------------------

    async def _exchange(
        self, host: _Host, url: URL, method: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        fresh_only = False
        while True:
            conn = None if fresh_only else await self._take_idle(host)
            reused = conn is not None
            if conn is None:
                conn = await self._open(url)
            target = str(url) if conn.absolute_form else url.target
            request_headers = headers
            if conn.absolute_form:
                proxy = self.proxies.proxy_for(url.origin)
                if proxy is not None and proxy.authorization and not has(headers, "proxy-authorization"):
                    request_headers = [*headers, ("Proxy-Authorization", proxy.authorization)]
            try:
                return await conn.request(method, target, request_headers, body)
            except ConnectionLost:
                await conn.abandon()
                if reused and conn.received_in_cycle == 0 and method in IDEMPOTENT_METHODS:
                    # the server closed the idle connection as we sent: try once on a new connection
                    self.stats.retried_on_new_connection += 1
                    fresh_only = True
                    continue
                raise
            except BaseException:
                await conn.abandon()
                raise

    async def _take_idle(self, host: _Host) -> Connection | None:
        now = trio.current_time()
        while host.idle:
            conn = host.idle.pop()
            if now - conn.idle_since > self.idle_timeout or conn.is_readable():
                self.stats.stale_discarded += 1
                await conn.abandon()
                continue
            self.stats.connections_reused += 1
            return conn
        return None

    async def _open(self, url: URL) -> Connection:
        proxy: ProxyURL | None = self.proxies.proxy_for(url.origin)
        context = self._context_for(url) if url.scheme == "https" else None
        conn = await open_connection(url.origin, self.timeouts, context, proxy=proxy)
        self.stats.connections_opened += 1
        return conn

    def _context_for(self, url: URL) -> ssl.SSLContext:
        authority = url.authority
        context = self._ssl_contexts.get(authority)
        if context is None:
            factory = self._ssl_context_for or (lambda _authority: create_ssl_context())
            context = self._ssl_contexts[authority] = factory(authority)
        return context

    async def _release(self, host: _Host, conn: Connection) -> None:
        if conn.reusable and not self._closed and len(host.idle) < self.max_per_host:
            host.idle.append(conn)
        else:
            await conn.abandon()
