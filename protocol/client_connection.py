"""The client side of one connection as a pure state machine (h11's way): calls become packets, reply packets
become the call they answer. No I/O, no clock: the trio bindings (``protocol.client``) send and receive the bytes.

A call without an id is answered in order with the other calls without an id (protocol 0.2.8); a call with an id
(the request-ids extension) is answered whenever its reply comes. A reply that cannot be matched (an id not in
flight, an in-order reply nobody waits for, one that cannot be decoded while calls with ids are out) means the
connection can no longer be trusted: it is broken, and every call still waiting gets the error.
"""

from __future__ import annotations

import collections
from typing import Any, Generic, TypeVar

import attrs

from protocol.codec import decode_reply, encode_request
from protocol.errors import ProtocolViolation, ProxyError
from protocol.messages import Reply, Request

#: what a caller uses to recognise its call (the bindings use their waiter objects)
H = TypeVar("H")


@attrs.frozen
class Answered(Generic[H]):
    """A reply for the call ``handle``: ``reply``, or ``error`` when the reply was not a valid one."""

    handle: H
    reply: Reply | None = None
    error: ProxyError | None = None


@attrs.frozen
class Broken(Generic[H]):
    """The connection cannot be used any more: ``error`` says why; ``waiting`` are the calls it fails."""

    error: ProxyError
    waiting: tuple[H, ...]


class ClientConnection(Generic[H]):
    def __init__(self) -> None:
        #: calls without an id, in the order they were sent (their replies come in that order)
        self._in_order: collections.deque[tuple[H, str]] = collections.deque()
        #: calls with an id, by id (their replies come in any order)
        self._by_id: dict[int, tuple[H, str]] = {}
        self._next_id = 1
        #: why the connection cannot be used, once it cannot
        self.closed: ProxyError | None = None

    @property
    def waiting(self) -> int:
        return len(self._in_order) + len(self._by_id)

    def next_id(self) -> int:
        request_id, self._next_id = self._next_id, self._next_id + 1
        return request_id

    @staticmethod
    def packet(method: str, args: list[Any], request_id: int | None = None) -> bytes:
        """A call's packet (ValueError when it does not fit one)."""
        return encode_request(Request(method, args, id=request_id))

    def expect(self, handle: H, method: str, request_id: int | None = None) -> None:
        """A call's packet is being sent: its reply is now expected (``request_id``: matched by id, else in order,
        so calls without an id must be expected in the order they are sent)."""
        if self.closed is not None:
            raise self.closed
        if request_id is None:
            self._in_order.append((handle, method))
        else:
            self._by_id[request_id] = (handle, method)

    def receive(self, data: bytes, truncated: bool = False) -> Answered[H] | Broken[H]:
        """The call a reply packet answers; or Broken when it cannot be matched to one."""
        reply: Reply | ProtocolViolation
        try:
            reply = decode_reply(data) if not truncated else ProtocolViolation("a reply was truncated")
        except ProtocolViolation as e:
            reply = e
        if isinstance(reply, Reply) and reply.id is not None:
            found = self._by_id.pop(reply.id, None)
            if found is None:
                return self.close(
                    ProtocolViolation(f"the proxy answered request id {reply.id}, which is not in flight")
                )
            return Answered(found[0], reply)
        if not self._in_order:
            # Without an id, a reply can only answer the oldest in-order call. With ids in use, a reply we cannot
            # decode cannot be matched to anything: the connection is no longer usable.
            why = str(reply) if isinstance(reply, ProtocolViolation) else "the proxy sent a reply nobody asked for"
            return self.close(ProtocolViolation(why))
        handle, method = self._in_order.popleft()
        if isinstance(reply, ProtocolViolation):
            return Answered(handle, error=ProtocolViolation(f"reply to {method}: {reply}"))
        return Answered(handle, reply)

    def close(self, error: ProxyError) -> Broken[H]:
        """The connection ends (EOF, a send that failed, a reply that cannot be matched): every waiting call fails
        with the first reason."""
        if self.closed is None:
            self.closed = error
        waiting = tuple(handle for handle, _ in self._in_order) + tuple(handle for handle, _ in self._by_id.values())
        self._in_order.clear()
        self._by_id.clear()
        return Broken(self.closed, waiting)


__all__ = ["Answered", "Broken", "ClientConnection"]
