"""The server side of a connection as a pure state machine: what a packet is, in which order replies leave, and the
per-connection limits decided on what arrived, given the time. No sockets."""

from __future__ import annotations

import json

from protocol.errors import ErrorCode, ProtocolViolation
from protocol.messages import Reply, Request
from protocol.server_connection import (
    AnswerNow,
    ConnectionLimits,
    InTurn,
    Queued,
    Refusal,
    Run,
    ServerConnection,
)


def packet(method: str, *args: object, request_id: int | None = None) -> bytes:
    doc: dict[str, object] = {"method": method, "args": list(args)}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()


def arrive(conn: ServerConnection, data: bytes, now: float = 0.0):
    return conn.accept(conn.decode(data, False), len(data), now)


def test_requests_without_ids_wait_their_turn_one_at_a_time() -> None:
    conn = ServerConnection()
    assert arrive(conn, packet("OpenImage", "oci:/a")) == InTurn()
    assert arrive(conn, packet("GetManifest", 1)) == InTurn()
    first, second = conn.next_in_order(), conn.next_in_order()
    assert isinstance(first, Queued) and first.item.method == "OpenImage"
    assert isinstance(second, Queued) and second.item.method == "GetManifest"
    assert conn.next_in_order() is None
    assert conn.unanswered == 2 and not conn.sent() and conn.sent()


def test_only_a_lone_in_order_request_is_offered_for_an_answer_at_once() -> None:
    conn = ServerConnection()
    assert conn.only_in_order() is None
    arrive(conn, packet("GetManifest", 1))
    alone = conn.only_in_order()
    assert isinstance(alone, Queued) and alone.item.method == "GetManifest"
    assert conn.only_in_order() is alone, "offering does not take it"
    arrive(conn, packet("GetConfig", 1))
    assert conn.only_in_order() is None, "with another behind it, it waits its turn"
    assert conn.next_in_order() is alone
    assert conn.only_in_order().item.method == "GetConfig"


def test_requests_with_ids_run_at_once_and_an_id_in_flight_is_refused_at_once() -> None:
    conn = ServerConnection()
    run = arrive(conn, packet("FinishPipe", 5, request_id=7))
    assert isinstance(run, Run) and run.request_id == 7
    again = arrive(conn, packet("GetManifest", 1, request_id=7))
    assert isinstance(again, AnswerNow) and again.refusal is Refusal.ID_IN_USE
    assert again.reply.id == 7 and "request id 7 is already in use" in again.reply.error
    conn.done(7)
    assert isinstance(arrive(conn, packet("GetManifest", 1, request_id=7)), Run)


def test_a_refusal_of_an_in_order_request_leaves_in_its_turn_not_ahead() -> None:
    conn = ServerConnection(ConnectionLimits(requests_per_second=1.0, request_burst=1))
    assert arrive(conn, packet("OpenImage", "oci:/a"), now=0.0) == InTurn()
    refused = arrive(conn, packet("GetManifest", 1), now=0.0)  # over the rate: no token left
    assert refused == InTurn(Refusal.RATE)
    first, second = conn.next_in_order(), conn.next_in_order()
    assert isinstance(first.item, Request) and first.item.method == "OpenImage"
    assert isinstance(second.item, Reply) and second.item.error_code is ErrorCode.RETRYABLE
    assert "request rate limit exceeded (1 requests per second, bursts of 1)" in second.item.error
    assert isinstance(arrive(conn, packet("GetManifest", 1), now=1.0), InTurn)  # a second later: a token again


def test_a_refusal_of_a_request_with_an_id_carries_the_id() -> None:
    conn = ServerConnection(ConnectionLimits(requests_per_second=1.0, request_burst=1))
    arrive(conn, packet("Initialize", request_id=1))
    refused = arrive(conn, packet("GetManifest", 1, request_id=2))
    assert isinstance(refused, AnswerNow) and refused.reply.id == 2 and refused.refusal is Refusal.RATE


def test_the_servers_own_refusal_takes_the_same_way() -> None:
    conn = ServerConnection()
    item = conn.decode(packet("GetBlob", 1, "sha256:" + "0" * 64, 3), False)
    assert conn.refuse(item, Reply.failure("busy"), 0) == InTurn()
    queued = conn.next_in_order()
    assert isinstance(queued.item, Reply) and queued.item.error == "busy" and conn.unanswered == 1


def test_a_packet_over_the_servers_size_limit_is_a_violation_that_keeps_its_id() -> None:
    conn = ServerConnection(ConnectionLimits(max_request_size=600))
    data = packet("OpenImage", "oci:/" + "x" * 1000, request_id=9)
    item = conn.decode(data, False)
    assert isinstance(item, ProtocolViolation) and item.request_id == 9
    assert "exceeds this server's 600 byte request limit" in item.message
    assert isinstance(conn.accept(item, len(data), 0.0), Run)  # answered (with the error) under its id


def test_shutdown_and_the_pending_limit() -> None:
    conn = ServerConnection(ConnectionLimits(max_pending=2))
    assert conn.is_shutdown(conn.decode(packet("Shutdown"), False))
    arrive(conn, packet("GetManifest", 1))
    assert not conn.over_pending
    arrive(conn, packet("GetManifest", 1))
    assert conn.over_pending  # two replies owed and unread: the session closes the connection


def test_a_packet_of_exactly_the_size_limit_is_a_request_and_one_byte_more_is_not() -> None:
    conn = ServerConnection(ConnectionLimits(max_request_size=600))
    base = packet("OpenImage", "oci:/")
    exact = packet("OpenImage", "oci:/" + "x" * (600 - len(base)))
    assert len(exact) == 600
    assert isinstance(conn.decode(exact, False), Request)
    over = packet("OpenImage", "oci:/" + "x" * (601 - len(base)))
    assert isinstance(conn.decode(over, False), ProtocolViolation)


def test_refused_requests_count_as_owed_replies_toward_the_pending_limit() -> None:
    """A flood the server refuses (rate, its own limits) still owes replies: it reaches the pending limit too."""
    conn = ServerConnection(ConnectionLimits(max_pending=3))
    item = conn.decode(packet("GetManifest", 1), False)
    for owed in (1, 2):
        conn.refuse(item, Reply.failure("busy"), 0)
        assert conn.unanswered == owed and not conn.over_pending
    conn.refuse(item, Reply.failure("busy"), 0)
    assert conn.over_pending
    assert not conn.sent() and conn.unanswered == 2 and not conn.over_pending
