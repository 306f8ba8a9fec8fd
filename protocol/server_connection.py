"""The server side of one connection as a pure state machine (h11's way): packets in, decisions out. No I/O and
no clock (the time is given): the trio session (``proxy.server.session``) reads and writes the socket, runs the
methods, and tells this what happened.

It decides:

- what a packet is: a request, a violation to answer (bad JSON, over the size limit, a bad id), or Shutdown;
- in which order replies leave: requests without an id in arrival order (protocol 0.2.8), one at a time; those
  with an id (the request-ids extension) as soon as they are done. A request refused without being run (the rate
  limit, an id already in flight, a refusal of the server's) is answered in its turn like any other, or at once
  when it carries an id;
- the per-connection limits that are decisions on what arrived: the request rate (a token bucket), the packet
  size, requests with ids in flight, and how many replies may be owed before the client is taken as not reading.
"""

from __future__ import annotations

import collections
import enum

import attrs

from protocol.codec import MAX_MSG_SIZE, decode_request
from protocol.errors import ErrorCode, ProtocolViolation
from protocol.messages import Reply, Request

#: requests a client may send before reading replies, before the connection is closed as misbehaving
MAX_PENDING_REQUESTS = 4096


@attrs.frozen
class ConnectionLimits:
    """The limits a connection's packets are decided against. ``None``: no limit."""

    max_request_size: int = MAX_MSG_SIZE
    requests_per_second: float | None = None
    request_burst: int = 1000
    max_pending: int = MAX_PENDING_REQUESTS


class RequestRate:
    """A token bucket: ``allow(now)`` says whether one more request fits the rate."""

    def __init__(self, per_second: float | None, burst: int) -> None:
        self.per_second = per_second
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        if self.per_second is None:
            return True
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Refusal(enum.Enum):
    """Why a request was answered without being run."""

    RATE = "rate"
    ID_IN_USE = "id in use"


@attrs.frozen
class Queued:
    """An in-order item: a request (or violation) to run in its turn, or a reply already decided for one."""

    item: Request | ProtocolViolation | Reply
    size: int


@attrs.frozen
class Run:
    """A request with an id: run it now (its reply leaves whenever it is done)."""

    item: Request | ProtocolViolation
    request_id: int
    size: int


@attrs.frozen
class AnswerNow:
    """A reply for a request with an id that was not run (a refusal): send it at once."""

    reply: Reply
    size: int
    refusal: Refusal | None = None


@attrs.frozen
class InTurn:
    """A request without an id was queued (to run, or with its refusal): the in-order queue has more."""

    refusal: Refusal | None = None


Decision = Run | AnswerNow | InTurn


def request_id_of(item: Request | ProtocolViolation) -> int | None:
    return item.id if isinstance(item, Request) else item.request_id


class ServerConnection:
    def __init__(self, limits: ConnectionLimits | None = None) -> None:
        self.limits = limits or ConnectionLimits()
        self._rate = RequestRate(self.limits.requests_per_second, self.limits.request_burst)
        self._in_order: collections.deque[Queued] = collections.deque()
        self._ids_in_flight: set[int] = set()
        #: requests received and not answered on the socket yet
        self.unanswered = 0

    # ------------------------------------------------------------------ packets in

    def decode(self, data: bytes, truncated: bool) -> Request | ProtocolViolation:
        """One packet: a request, or the violation to answer (a packet over this server's size limit is one)."""
        decoded = decode_request(data, truncated=truncated)
        limit = self.limits.max_request_size
        if len(data) > limit and not truncated and limit < MAX_MSG_SIZE:
            return ProtocolViolation(
                f"invalid request: message exceeds this server's {limit} byte request limit",
                request_id=request_id_of(decoded),  # answered with its id, so a client using ids can match it
            )
        return decoded

    @staticmethod
    def is_shutdown(item: Request | ProtocolViolation) -> bool:
        return isinstance(item, Request) and item.method == "Shutdown"

    @property
    def over_pending(self) -> bool:
        """The client owes the reading of too many replies: the connection is to be closed."""
        return self.unanswered >= self.limits.max_pending

    def accept(self, item: Request | ProtocolViolation, size: int, now: float) -> Decision:
        """A request to be answered: run it (with an id), queue it in its turn, or refuse it by a limit."""
        self.unanswered += 1
        request_id = request_id_of(item)
        if not self._rate.allow(now):
            rate = self.limits.requests_per_second
            reply = Reply.failure(
                f"request rate limit exceeded ({rate:g} requests per second, bursts of "
                f"{self.limits.request_burst}); slow down and retry",
                ErrorCode.RETRYABLE,
            )
            return self._refused(reply, item, size, Refusal.RATE)
        if request_id is None:
            self._in_order.append(Queued(item, size))
            return InTurn()
        if request_id in self._ids_in_flight:
            return self._refused(
                Reply.failure(f"request id {request_id} is already in use"), item, size, Refusal.ID_IN_USE
            )
        self._ids_in_flight.add(request_id)
        return Run(item, request_id, size)

    def refuse(self, item: Request | ProtocolViolation, reply: Reply, size: int) -> Decision:
        """A request the server answers with ``reply`` without running it (a limit of its own)."""
        self.unanswered += 1
        return self._refused(reply, item, size, None)

    def _refused(
        self, reply: Reply, item: Request | ProtocolViolation, size: int, why: Refusal | None
    ) -> AnswerNow | InTurn:
        request_id = request_id_of(item)
        if request_id is None:
            self._in_order.append(Queued(reply, size))
            return InTurn(why)
        return AnswerNow(attrs.evolve(reply, id=request_id), size, why)

    # ------------------------------------------------------------------ running and answering

    def only_in_order(self) -> Queued | None:
        """The in-order item, when it is the only one queued (it stays queued): a caller with nothing in progress
        may answer it at once, and then takes it with :meth:`next_in_order`."""
        return self._in_order[0] if len(self._in_order) == 1 else None

    def next_in_order(self) -> Queued | None:
        """The next in-order item, once the previous one is done (the caller runs them one at a time)."""
        return self._in_order.popleft() if self._in_order else None

    def done(self, request_id: int) -> None:
        """A request with an id was run; its id may be used again."""
        self._ids_in_flight.discard(request_id)

    def sent(self) -> bool:
        """A reply left on the socket; whether every request received so far is answered."""
        self.unanswered -= 1
        return self.unanswered == 0


__all__ = [
    "MAX_PENDING_REQUESTS",
    "AnswerNow",
    "ConnectionLimits",
    "Decision",
    "InTurn",
    "Queued",
    "Refusal",
    "RequestRate",
    "Run",
    "ServerConnection",
    "request_id_of",
]
