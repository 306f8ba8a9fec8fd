"""One client connection: the receive loop, the in-order dispatcher, the requests with ids, the sender, and
the producers.

```
session nursery
├── receiver     recvmsg → decode → in-order queue, or a task of its own for a request with an id;
│                EOF → cancel all; Shutdown → answer what is pending (briefly), cancel all
├── dispatcher   requests without an id, one by one, in arrival order
├── one task per request with an id (request-ids extension; at most ``concurrent_requests`` at work)
├── sender       the outbox → the socket, in the order replies were produced
└── producers    one task per open pipe (started by the handler)
```

The receiver never waits on anything but the socket, so Shutdown and socket EOF take effect at once even
while FinishPipe waits for a stalled producer. Replies go through one sender task, so no task ever holds a
lock while the socket blocks; in-order replies keep their order because the dispatcher queues them in order.
"""

from __future__ import annotations

import array
import collections
import contextlib
import logging
import math
import os
import socket

import attrs
import trio

from protocol.codec import MAX_MSG_SIZE, decode_request, encode_reply
from protocol.errors import ErrorCode, ProtocolViolation
from protocol.messages import Reply, Request
from proxy.handler import Handler, Outcome
from proxy.limits import RequestRate
from proxy.options import ProxyOptions
from proxy.resources import SharedResources, open_resources

log = logging.getLogger(__name__)

#: requests a client may send before reading replies, before the session is closed as misbehaving
MAX_PENDING_REQUESTS = 4096
#: how long pending requests may still be answered after Shutdown
SHUTDOWN_GRACE = 0.5
_ANCILLARY_SPACE = socket.CMSG_SPACE(16 * array.array("i").itemsize)


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def _request_id(item: Request | ProtocolViolation) -> int | None:
    return item.id if isinstance(item, Request) else item.request_id


class Session:
    """Serves the protocol on one connected SOCK_SEQPACKET socket until EOF or Shutdown."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        options: ProxyOptions,
        resources: SharedResources,
        peer: str = "client",
    ) -> None:
        self._sock = sock
        self._options = options
        self._resources = resources
        self._limits = options.limits
        self._peer = peer
        self._in_order: collections.deque[Request | ProtocolViolation] = collections.deque()
        self._in_order_changed = trio.Event()
        self._receiving = True
        self._ids_in_flight: set[int] = set()
        self._id_slots = trio.CapacityLimiter(max(1, self._limits.concurrent_requests))
        self._rate = RequestRate(self._limits.requests_per_second, self._limits.request_burst)
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[Outcome](math.inf)
        #: requests received and not yet answered on the socket
        self._unanswered = 0
        self._all_answered = trio.Event()
        self._handler: Handler | None = None

    @property
    def busy(self) -> bool:
        """Whether a request is unanswered or a transfer is in flight (a daemon's shutdown waits for those)."""
        return self._unanswered > 0 or (self._handler is not None and self._handler.transfers_in_flight)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                handler = self._handler = Handler(self._options, nursery.start_soon, self._resources)
                try:
                    nursery.start_soon(self._sender, nursery.cancel_scope)
                    nursery.start_soon(self._dispatch, handler)
                    shutdown = await self._receive(handler, nursery)
                    if shutdown and self._unanswered:
                        # Answer what came before Shutdown, but never wait long.
                        with trio.move_on_after(SHUTDOWN_GRACE):
                            await self._all_answered.wait()
                    nursery.cancel_scope.cancel()
                finally:
                    await handler.aclose()
        finally:
            # replies that were never sent: our copies of their pipes' read ends
            self._outbox_send.close()
            while True:
                try:
                    outcome = self._outbox_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                _close_fds(outcome.fds)

    # ------------------------------------------------------------------ receiving

    async def _receive(self, handler: Handler, nursery: trio.Nursery) -> bool:
        """Read packets until EOF (False) or Shutdown (True)."""
        try:
            while True:
                try:
                    data, ancdata, flags, _ = await self._sock.recvmsg(
                        MAX_MSG_SIZE + 1, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                    )
                except OSError as e:
                    log.warning("%s: socket: %s; ending session", self._peer, e)
                    return False
                stray_fds = _fds_from_ancillary(ancdata)
                if stray_fds:
                    # Clients never send descriptors; do not leak what a confused one sends.
                    _close_fds(stray_fds)
                if not data:
                    log.debug("%s closed the socket", self._peer)
                    return False
                item = self._decode(data, bool(flags & socket.MSG_TRUNC))
                if isinstance(item, Request) and item.method == "Shutdown":
                    log.debug("%s: Shutdown requested", self._peer)
                    return True
                if self._unanswered >= MAX_PENDING_REQUESTS:
                    log.error(
                        "%s sent over %d requests without reading replies; ending session",
                        self._peer,
                        MAX_PENDING_REQUESTS,
                    )
                    return False
                self._unanswered += 1
                self._all_answered = trio.Event()
                self._accept(item, handler, nursery)
        finally:
            self._receiving = False
            self._in_order_changed.set()

    def _decode(self, data: bytes, truncated: bool) -> Request | ProtocolViolation:
        decoded = decode_request(data, truncated=truncated)
        limit = self._limits.max_request_size
        if len(data) > limit and not truncated and limit < MAX_MSG_SIZE:
            return ProtocolViolation(
                f"invalid request: message exceeds this server's {limit} byte request limit",
                request_id=_request_id(decoded),  # answered with its id, so a client using ids can match it
            )
        return decoded

    def _accept(self, item: Request | ProtocolViolation, handler: Handler, nursery: trio.Nursery) -> None:
        """Queue a request (or answer it at once when it breaks a limit)."""
        request_id = _request_id(item)
        if not self._rate.allow(trio.current_time()):
            rate = self._limits.requests_per_second
            self._answer_now(
                Reply.failure(
                    f"request rate limit exceeded ({rate:g} requests per second, bursts of "
                    f"{self._limits.request_burst}); slow down and retry",
                    ErrorCode.RETRYABLE,
                ),
                request_id,
            )
            return
        if request_id is None:
            self._in_order.append(item)
            self._in_order_changed.set()
            return
        if request_id in self._ids_in_flight:
            self._answer_now(Reply.failure(f"request id {request_id} is already in use"), request_id)
            return
        self._ids_in_flight.add(request_id)
        nursery.start_soon(self._handle_with_id, handler, item, request_id)

    def _answer_now(self, reply: Reply, request_id: int | None) -> None:
        self._outbox_send.send_nowait(Outcome(attrs.evolve(reply, id=request_id)))

    # ------------------------------------------------------------------ handling

    async def _dispatch(self, handler: Handler) -> None:
        while True:
            while not self._in_order:
                if not self._receiving:
                    return
                self._in_order_changed = trio.Event()
                await self._in_order_changed.wait()
            request = self._in_order.popleft()
            if isinstance(request, Request):
                log.debug("request %s %s", request.method, _shorten(request.args))
            self._outbox_send.send_nowait(await handler.handle(request))

    async def _handle_with_id(self, handler: Handler, item: Request | ProtocolViolation, request_id: int) -> None:
        try:
            async with self._id_slots:
                if isinstance(item, Request):
                    log.debug("request %s %s id %d", item.method, _shorten(item.args), request_id)
                outcome = await handler.handle(item)
            reply = outcome.reply
            if reply is not None:
                outcome = attrs.evolve(outcome, reply=attrs.evolve(reply, id=request_id))
            self._outbox_send.send_nowait(outcome)
        finally:
            self._ids_in_flight.discard(request_id)

    # ------------------------------------------------------------------ sending

    async def _sender(self, session_scope: trio.CancelScope) -> None:
        async for outcome in self._outbox_recv:
            try:
                await self._send(outcome)
            except OSError as e:
                log.warning("%s: cannot send reply: %s; ending session", self._peer, e)
                session_scope.cancel()
                return
            self._unanswered -= 1
            if self._unanswered == 0:
                self._all_answered.set()

    async def _send(self, outcome: Outcome) -> None:
        try:
            if outcome.reply is None:
                return
            data = encode_reply(outcome.reply)
            log.debug("reply %s", data[:300])
            if outcome.fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", outcome.fds))]
                await self._sock.sendmsg([data], ancillary)
            else:
                await self._sock.send(data)
        finally:
            # Our copies of the read ends: the client has its own now (or never will).
            _close_fds(outcome.fds)


def _shorten(args: object) -> str:
    text = repr(args)
    return text if len(text) <= 200 else text[:200] + "..."


async def serve_socket(sock: socket.socket, options: ProxyOptions) -> None:
    """Serve one client on an already connected stdlib socket."""
    tsock = trio.socket.from_stdlib_socket(sock)
    with tsock:
        async with open_resources(options) as resources:
            await Session(tsock, options, resources).run()
