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

import logging
import math
import os
import socket
import time
from collections.abc import Callable

import attrs
import trio

from protocol.codec import MAX_MSG_SIZE, encode_reply, shown
from protocol.fds import ancillary_space, close_fds, fds_from_ancillary, fds_to_ancillary
from protocol.messages import Reply, Request
from protocol.methods import METHODS, Param
from protocol.server_connection import AnswerNow, ConnectionLimits, Decision, InTurn, Refusal, Run, ServerConnection
from protocol.session_settings import SECRET_METHODS, redacted
from proxy.common import threads
from proxy.server.handler import Handler, Outcome
from proxy.server.limits import Account, Ledger, Resource, daemon_busy
from proxy.server.metrics import STATS, Client
from proxy.server.options import ProxyOptions
from proxy.server.peer import PeerCredentials, systemd_unit
from proxy.server.resources import SharedResources, open_resources
from proxy.sources.localfs import Identity, needs_switch

log = logging.getLogger(__name__)
#: one info line per failed request (who, what, why): image-proxy.requests
request_log = logging.getLogger("image-proxy.requests")

#: how long pending requests may still be answered after Shutdown
SHUTDOWN_GRACE = 0.5
_ANCILLARY_SPACE = ancillary_space(16)


@attrs.frozen
class _Encoded:
    """A reply ready for the socket: its packet (None: nothing to send, Shutdown), the fds to pass, and the
    queued bytes it holds until sent."""

    data: bytes | None
    fds: tuple[int, ...]
    size: int


def identity_of(peer: PeerCredentials | None) -> Identity | None:
    """Whose permissions this session's local file accesses use: the peer's, when it is not this process's own
    user (a daemon's client). None: the process's (a spawned proxy, whose client is its parent)."""
    if peer is None:
        return None
    identity = Identity(peer.uid, peer.gid, tuple(sorted(peer.groups)))
    return identity if needs_switch(identity) else None


#: a connection's failed requests get an info line each, in bursts of at most this many, refilled at this rate
FAILURE_LINES_BURST = 20
FAILURE_LINES_PER_SECOND = 1.0

#: packets a session reads one after the other without a checkpoint (see Session._receive_packet)
READS_BEFORE_CHECKPOINT = 16


# the flags of the per-request system calls as plain ints: the socket module's are IntFlag enums, and combining or
# testing those costs a few microseconds per request (the profile of 10,000 round trips showed 20,000 enum calls)
_RECEIVE_NOW = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_SEND_NOW = int(socket.MSG_DONTWAIT)
_TRUNCATED = int(socket.MSG_TRUNC)


def _args_shown(method: str, args: list, each: int | None = None) -> str:
    """A request's arguments for a log line: as one JSON value, or (``each``) each shown in at most that many
    characters, space-separated. A method's secrets (credentials) are never shown."""
    if method in SECRET_METHODS:
        return redacted(args)
    return shown(args) if each is None else " ".join(shown(a, each) for a in args)


def _request_shown(request: Request) -> str:
    """A request for a debug line: its method and arguments (see :func:`_args_shown`)."""
    return f"{shown(request.method, 100)} {_args_shown(request.method, request.args)}"


def _with_id(outcome: Outcome, request_id: int) -> Outcome:
    """The outcome with its reply carrying the request's id (extension request-ids)."""
    if outcome.reply is None:
        return outcome
    return attrs.evolve(outcome, reply=attrs.evolve(outcome.reply, id=request_id))


class Session:
    """Serves the protocol on one connected SOCK_SEQPACKET socket until EOF or Shutdown.

    ``peer`` is who is connected (SO_PEERCRED), ``ledger`` the daemon-wide accounting it shares with other
    sessions (None: a session of its own)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        options: ProxyOptions,
        resources: SharedResources,
        peer: PeerCredentials | None = None,
        ledger: Ledger | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        identity = identity_of(peer)
        if identity is not None:
            options = attrs.evolve(options, source_options=attrs.evolve(options.source_options, identity=identity))
        self._options = options
        self._resources = resources
        self._limits = options.limits
        self._peer = peer
        self.name = f"client pid {peer.pid} uid {peer.uid}" if peer is not None else "client"
        self._account: Account = (ledger or Ledger()).account(peer.uid if peer is not None else None, self._limits)
        account = self._account
        #: who is connected, for GetStatus, transfers' log lines and failed requests' (None: unknown peer)
        self.client: Client | None = None
        if peer is not None:
            self.client = Client(
                peer.pid,
                peer.uid,
                peer.gid,
                systemd_unit(peer.pid),
                held=lambda: (account.holds(Resource.IMAGES), account.holds(Resource.PIPES)),
            )
        #: what arrived, what is owed, in which order (pure: protocol.server_connection)
        self._conn = ServerConnection(
            ConnectionLimits(
                max_request_size=self._limits.max_request_size,
                requests_per_second=self._limits.requests_per_second,
                request_burst=self._limits.request_burst,
            )
        )
        self._in_order_changed = trio.Event()
        #: the dispatcher waits for an in-order request (nothing of the queue is in progress)
        self._dispatcher_idle = False
        self._receiving = True
        self._id_slots = trio.CapacityLimiter(max(1, self._limits.concurrent_requests))
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[_Encoded](math.inf)
        self._read_at_once = 0  # packets read without waiting since the last checkpoint
        #: replies queued for the sender and not sent yet (a reply is sent at once only when there are none)
        self._outbox_pending = 0
        #: the same socket, read and written by non-blocking calls of our own (no trip through trio's scheduler);
        #: None when no descriptor was left for it (EMFILE): then everything goes through trio's socket
        self._wire: socket.socket | None = _duplicate(sock)
        self._all_answered = trio.Event()
        self._handler: Handler | None = None
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._refusals_logged: set[str] = set()
        #: failed requests' info lines: a bucket of FAILURE_LINES_BURST refilled at FAILURE_LINES_PER_SECOND (a client
        #: that sends nothing but bad requests must not flood the journal); the rest go to debug, and are counted
        self._failure_lines = float(FAILURE_LINES_BURST)
        self._failure_lines_at = 0.0
        self._failures_unlogged = 0
        #: called when this session may have become idle (``busy`` turned false): the daemon's shutdown waits on it
        self._on_idle = on_idle or (lambda: None)

    @property
    def busy(self) -> bool:
        """Whether a request is unanswered or a transfer is in flight (a daemon's shutdown waits for those)."""
        return self._conn.unanswered > 0 or (self._handler is not None and self._handler.transfers_in_flight)

    async def run(self) -> None:
        """Serve until EOF or Shutdown. Whatever goes wrong inside (a bug in a handler, a sender, a producer) ends
        this session only: it is logged once with its traceback, and everything the session held is closed."""
        if self.client is not None:
            STATS.connected(self.client)
        try:
            with threads.client_threads(self._limits.worker_threads):
                await self._run()
        except Exception:
            log.exception("%s: internal error; closing this connection", self.name)
        finally:
            if self.client is not None:
                STATS.disconnected(self.client)
            if self._wire is not None:
                trio.lowlevel.notify_closing(self._wire)
                self._wire.close()
            self._account.release()

    async def _run(self) -> None:
        handler: Handler | None = None
        try:
            async with trio.open_nursery() as nursery:
                handler = self._handler = Handler(
                    self._options, nursery.start_soon, self._resources, self._account, self._on_idle, self.client
                )
                nursery.start_soon(self._sender, nursery.cancel_scope)
                nursery.start_soon(self._dispatch, handler)
                shutdown = await self._receive(handler, nursery)
                if shutdown and self._conn.unanswered:
                    # Answer what came before Shutdown, but never wait long.
                    with trio.move_on_after(SHUTDOWN_GRACE):
                        await self._all_answered.wait()
                nursery.cancel_scope.cancel()
        finally:
            # Only now, with every producer ended, are the pipes' write ends closed: a producer still alive could
            # otherwise write (sendfile) to an fd number that was closed, and maybe reused by another client.
            if handler is not None:
                await handler.aclose()
            # replies that were never sent: our copies of their pipes' read ends
            self._outbox_send.close()
            while True:
                try:
                    encoded = self._outbox_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                close_fds(encoded.fds)

    # ------------------------------------------------------------------ receiving

    async def _receive(self, handler: Handler, nursery: trio.Nursery) -> bool:
        """Read packets until EOF (False) or Shutdown (True)."""
        try:
            while True:
                try:
                    data, ancdata, flags = await self._receive_packet()
                except OSError as e:
                    log.warning("%s: socket: %s; ending session", self.name, e)
                    return False
                stray_fds = fds_from_ancillary(ancdata)
                if stray_fds:
                    # Clients never send descriptors; do not leak what a confused one sends.
                    close_fds(stray_fds)
                if not data:
                    log.debug("%s closed the socket", self.name)
                    return False
                item = self._conn.decode(data, bool(flags & _TRUNCATED))
                if self._conn.is_shutdown(item):
                    log.debug("%s: Shutdown requested", self.name)
                    return True
                if self._conn.over_pending:
                    STATS.refused("pending-requests")
                    log.error(
                        "%s sent over %d requests without reading replies; ending session",
                        self.name,
                        self._conn.limits.max_pending,
                    )
                    return False
                size = len(data)
                refused = self._account.queue(size)
                if refused == "connection":
                    STATS.refused("queued-request-bytes")
                    log.error(
                        "%s queued over %d bytes of requests and replies without reading replies; ending session",
                        self.name,
                        self._limits.queued_bytes,
                    )
                    return False
                if self._all_answered.is_set():  # a new request is unanswered: a new "all answered" to wait for
                    self._all_answered = trio.Event()
                if refused == "daemon":
                    error = daemon_busy(self._account.daemon_limits)
                    self._log_refusal("daemon-queued-request-bytes", error.message)
                    decision = self._conn.refuse(item, Reply.failure(error.message, error.code), 0)
                else:
                    decision = self._conn.accept(item, size, trio.current_time())
                self._carry_out(decision, handler, nursery)
        finally:
            self._receiving = False
            self._in_order_changed.set()

    async def _receive_packet(self) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
        """One packet: read at once when one is there (a non-blocking ``recvmsg``: no trip through the scheduler),
        else once the socket is readable. After :data:`READS_BEFORE_CHECKPOINT` packets read at once, a checkpoint:
        a client that keeps sending cannot hold the event loop from the other tasks and clients."""
        if self._wire is None:
            data, ancdata, flags, _ = await self._sock.recvmsg(
                MAX_MSG_SIZE + 1, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
            return data, ancdata, flags
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data, ancdata, flags, _ = self._wire.recvmsg(MAX_MSG_SIZE + 1, _ANCILLARY_SPACE, _RECEIVE_NOW)
            except BlockingIOError:
                self._read_at_once = 0
                await trio.lowlevel.wait_readable(self._wire)
                continue
            self._read_at_once += 1
            if self._read_at_once >= READS_BEFORE_CHECKPOINT:
                self._read_at_once = 0
                await trio.lowlevel.checkpoint()
            return data, ancdata, flags

    def _log_refusal(self, limit: str, why: str) -> None:
        """A refused request: a warning the first time this connection hits ``limit``, debug lines after (a flood
        of refused requests must not become a flood of log lines); counted in image_proxy_limit_refusals_total."""
        STATS.refused(limit)
        level = logging.DEBUG if limit in self._refusals_logged else logging.WARNING
        self._refusals_logged.add(limit)
        log.log(level, "%s: request refused: %s", self.name, why)

    def _carry_out(self, decision: Decision, handler: Handler, nursery: trio.Nursery) -> None:
        """Do what the connection decided for a request: run it (with an id), answer it now, or let the
        dispatcher take it in its turn."""
        refusal = decision.refusal if isinstance(decision, AnswerNow | InTurn) else None
        if refusal is Refusal.RATE:
            self._log_refusal(
                "requests-per-second", f"over the rate limit of {self._limits.requests_per_second:g} per second"
            )
        if isinstance(decision, Run):
            if not self._answer_with_id_now(handler, decision):
                nursery.start_soon(self._handle_with_id, handler, decision)
        elif isinstance(decision, AnswerNow):
            self._counted(None, "refused" if decision.refusal is not None else "error", 0.0)
            self._send_soon(Outcome(decision.reply), decision.size)
        elif not self._answer_now(handler):
            self._in_order_changed.set()

    def _answer_now(self, handler: Handler) -> bool:
        """Answer the in-order request just queued here, without a trip through the dispatcher, when nothing is
        ahead of it and it needs no waiting (``Handler.answer_now``): whether it was answered. The order of
        replies is kept: the dispatcher is idle and this request is the only one queued."""
        if not self._dispatcher_idle:
            return False
        queued = self._conn.only_in_order()
        if queued is None or not isinstance(queued.item, Request):
            return False
        outcome = self._outcome_at_once(handler, queued.item)
        if outcome is None:
            return False
        taken = self._conn.next_in_order()
        assert taken is queued
        if self._debug:
            log.debug("request %s", _request_shown(queued.item))
        self._send_soon(outcome, queued.size)
        return True

    def _outcome_at_once(self, handler: Handler, request: Request) -> Outcome | None:
        """``Handler.answer_now``, recorded like any request when it answered."""
        started = time.perf_counter()
        outcome = handler.answer_now(request)
        if outcome is not None:
            self._record(handler, request, outcome, started)
        return outcome

    def _answer_with_id_now(self, handler: Handler, run: Run) -> bool:
        """Answer a request with an id here when it needs no waiting (``Handler.answer_now``), without a task and a
        slot of its own: replies to requests with ids may leave in any order. Whether it was answered."""
        if not isinstance(run.item, Request):
            return False
        outcome = self._outcome_at_once(handler, run.item)
        if outcome is None:
            return False
        try:
            if self._debug:
                log.debug("request %s id %d", _request_shown(run.item), run.request_id)
            self._send_soon(_with_id(outcome, run.request_id), run.size)
        finally:
            self._conn.done(run.request_id)
        return True

    # ------------------------------------------------------------------ handling

    async def _dispatch(self, handler: Handler) -> None:
        while True:
            queued = self._conn.next_in_order()
            while queued is None:
                if not self._receiving:
                    return
                self._in_order_changed = trio.Event()
                self._dispatcher_idle = True
                try:
                    await self._in_order_changed.wait()
                finally:
                    self._dispatcher_idle = False
                queued = self._conn.next_in_order()
            if isinstance(queued.item, Reply):
                self._counted(None, "refused", 0.0)  # refused in its turn (the rate limit)
                self._send_soon(Outcome(queued.item), queued.size)
                continue
            if self._debug and isinstance(queued.item, Request):
                log.debug("request %s", _request_shown(queued.item))
            started = time.perf_counter()
            outcome = await handler.handle(queued.item)
            self._record(handler, queued.item, outcome, started)
            self._send_soon(outcome, queued.size)

    async def _handle_with_id(self, handler: Handler, run: Run) -> None:
        try:
            async with self._id_slots:
                item = run.item
                if self._debug and isinstance(item, Request):
                    log.debug("request %s id %d", _request_shown(item), run.request_id)
                started = time.perf_counter()
                outcome = await handler.handle(item)
                self._record(handler, item, outcome, started)
            self._send_soon(_with_id(outcome, run.request_id), run.size)
        finally:
            self._conn.done(run.request_id)

    # ------------------------------------------------------------------ recording

    def _counted(self, request: object, outcome: str, seconds: float) -> None:
        """Count a request (image_proxy_requests_total, _request_duration_seconds): its method, when it is one of
        the protocol's, else ``invalid`` (a bounded label); ``unknown`` for one refused before it was read (None)."""
        if request is None:
            method = "unknown"
        else:
            method = request.method if isinstance(request, Request) and request.method in METHODS else "invalid"
        STATS.request(method, outcome, seconds)
        if self.client is not None:
            self.client.requests += 1

    def _record(self, handler: Handler, request: object, outcome: Outcome, started: float) -> None:
        """A request was answered: counted, and a failure logged in one info line (who, what, why). A failed
        FinishPipe is not: its transfer's own line says how it ended."""
        reply = outcome.reply
        failed = reply is not None and not reply.success
        self._counted(request, "error" if failed else "ok", time.perf_counter() - started)
        if failed and request_log.isEnabledFor(logging.INFO) and getattr(request, "method", "") != "FinishPipe":
            self._log_failure(handler, request, reply.error)

    def _log_failure(self, handler: Handler, request: object, error: str) -> None:
        at = time.monotonic()
        tokens = min(
            FAILURE_LINES_BURST, self._failure_lines + (at - self._failure_lines_at) * FAILURE_LINES_PER_SECOND
        )
        self._failure_lines_at = at
        if tokens < 1:
            self._failure_lines = tokens
            self._failures_unlogged += 1
            if not request_log.isEnabledFor(logging.DEBUG):
                return
            level = logging.DEBUG
        else:
            self._failure_lines = tokens - 1
            level = logging.INFO
        if isinstance(request, Request):
            args = list(request.args)
            if args and request.method in METHODS and METHODS[request.method].params[:1] == (Param.IMAGE_ID,):
                reference = handler.image_reference(args[0])
                if reference is not None:
                    args[0] = reference
            method = request.method if request.method in METHODS else shown(request.method, 100)
            what = f"{method} {_args_shown(request.method, args, 300)}".rstrip()
        else:
            what = "an invalid request"
        unlogged = ""
        if level == logging.INFO and self._failures_unlogged:
            unlogged = f" ({self._failures_unlogged} more failed requests of this connection were not logged)"
            self._failures_unlogged = 0
        request_log.log(level, "%s: %s failed: %s%s", self.client or self.name, what, error, unlogged)

    def _send_soon(self, outcome: Outcome, request_size: int) -> None:
        """Encode a reply now (once) and send it at once if nothing is queued before it and the socket takes it
        without waiting; else queue it for the sender. It holds its own size in queued bytes instead of its
        request's until it is sent."""
        data = self._encode(outcome.reply) if outcome.reply is not None else None
        size = len(data) if data is not None else 0
        self._account.requeue(request_size, size)
        encoded = _Encoded(data, outcome.fds, size)
        if self._outbox_pending == 0 and self._send_now(encoded):
            return
        self._outbox_pending += 1
        self._outbox_send.send_nowait(encoded)

    def _send_now(self, encoded: _Encoded) -> bool:
        """Send a reply without waiting (a non-blocking ``sendmsg``): whether it was sent. A full socket buffer, or
        any error, leaves it to the sender, which waits, or reports the error and ends the session."""
        if self._wire is None:
            return False
        if encoded.data is not None:
            ancillary = fds_to_ancillary(encoded.fds) if encoded.fds else []
            try:
                self._wire.sendmsg([encoded.data], ancillary, _SEND_NOW)
            except OSError:
                return False
            if self._debug:
                log.debug("reply %s", encoded.data[:300])
        close_fds(encoded.fds)  # our copies of the read ends: the client has its own now
        self._replied(encoded)
        return True

    def _replied(self, encoded: _Encoded) -> None:
        self._account.unqueue(encoded.size)
        if self._conn.sent():
            self._all_answered.set()
            self._on_idle()

    def _encode(self, reply: Reply) -> bytes:
        try:
            return encode_reply(reply)
        except Exception:
            log.exception("%s: cannot encode a reply; answering with an internal error instead", self.name)
            return encode_reply(
                attrs.evolve(Reply.failure("internal error: the reply could not be encoded"), id=reply.id)
            )

    # ------------------------------------------------------------------ sending

    async def _sender(self, session_scope: trio.CancelScope) -> None:
        async for encoded in self._outbox_recv:
            sent = False
            try:
                await self._send(encoded)
                sent = True
            except OSError as e:
                log.warning("%s: cannot send reply: %s; ending session", self.name, e)
                session_scope.cancel()
                return
            finally:
                self._outbox_pending -= 1
                if not sent:
                    self._account.unqueue(encoded.size)
            self._replied(encoded)

    async def _send(self, encoded: _Encoded) -> None:
        try:
            if encoded.data is None:
                return
            if self._debug:
                log.debug("reply %s", encoded.data[:300])
            if encoded.fds:
                await self._sock.sendmsg([encoded.data], fds_to_ancillary(encoded.fds))
            else:
                await self._sock.send(encoded.data)
        finally:
            # Our copies of the read ends: the client has its own now (or never will).
            close_fds(encoded.fds)


def _duplicate(sock: trio.socket.SocketType) -> socket.socket | None:
    """A stdlib socket object on a duplicate of ``sock``'s descriptor (close-on-exec, non-blocking like it), or None
    when the process has no descriptor left."""
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except OSError as e:
        log.warning("cannot duplicate a connection's socket (%s): serving it through trio's socket only", e.strerror)
        return None


async def serve_socket(sock: socket.socket, options: ProxyOptions) -> None:
    """Serve one client on an already connected stdlib socket (spawned, or one connection passed by systemd)."""
    from proxy.server.peer import peer_credentials

    try:
        peer: PeerCredentials | None = peer_credentials(sock)
    except OSError:
        peer = None
    tsock = trio.socket.from_stdlib_socket(sock)
    with tsock:
        async with open_resources(options) as resources:
            await Session(tsock, options, resources, peer=peer).run()
