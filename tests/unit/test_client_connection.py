"""The client side of a connection as a pure state machine: which reply answers which call, without sockets."""

from __future__ import annotations

from protocol.client_connection import Answered, Broken, ClientConnection
from protocol.codec import encode_reply
from protocol.errors import ProtocolViolation
from protocol.messages import Reply


def reply(value: object, request_id: int | None = None) -> bytes:
    return encode_reply(Reply(success=True, value=value, id=request_id))


def test_calls_without_ids_are_answered_in_order() -> None:
    conn: ClientConnection[str] = ClientConnection()
    conn.expect("a", "OpenImage")
    conn.expect("b", "GetManifest")
    first, second = conn.receive(reply(1)), conn.receive(reply(2))
    assert isinstance(first, Answered) and first.handle == "a" and first.reply.value == 1
    assert isinstance(second, Answered) and second.handle == "b" and second.reply.value == 2
    assert conn.waiting == 0


def test_calls_with_ids_are_answered_in_any_order_between_in_order_ones() -> None:
    conn: ClientConnection[str] = ClientConnection()
    one, two = conn.next_id(), conn.next_id()
    conn.expect("slow", "FinishPipe", one)
    conn.expect("ordered", "GetManifest")
    conn.expect("fast", "GetManifest", two)
    got = [conn.receive(reply("f", two)), conn.receive(reply("o")), conn.receive(reply("s", one))]
    assert [a.handle for a in got if isinstance(a, Answered)] == ["fast", "ordered", "slow"]


def test_an_id_not_in_flight_breaks_the_connection_and_fails_every_waiting_call() -> None:
    conn: ClientConnection[str] = ClientConnection()
    conn.expect("a", "OpenImage")
    conn.expect("b", "GetBlob", conn.next_id())
    broken = conn.receive(reply(0, request_id=99))
    assert isinstance(broken, Broken) and set(broken.waiting) == {"a", "b"}
    assert "request id 99, which is not in flight" in broken.error.message
    assert conn.closed is broken.error and conn.waiting == 0


def test_a_reply_nobody_asked_for_breaks_the_connection() -> None:
    conn: ClientConnection[str] = ClientConnection()
    broken = conn.receive(reply(1))
    assert isinstance(broken, Broken) and "a reply nobody asked for" in broken.error.message


def test_a_bad_reply_to_an_in_order_call_fails_that_call_only() -> None:
    conn: ClientConnection[str] = ClientConnection()
    conn.expect("a", "GetManifest")
    conn.expect("b", "GetConfig")
    bad = conn.receive(b"not json")
    assert isinstance(bad, Answered) and bad.handle == "a" and isinstance(bad.error, ProtocolViolation)
    assert "reply to GetManifest" in bad.error.message
    good = conn.receive(reply("x"))
    assert isinstance(good, Answered) and good.handle == "b" and good.reply.value == "x"


def test_a_truncated_reply_is_an_error_for_its_call() -> None:
    conn: ClientConnection[str] = ClientConnection()
    conn.expect("a", "GetLayerInfo")
    answered = conn.receive(reply([1, 2]), truncated=True)
    assert isinstance(answered, Answered) and "truncated" in answered.error.message


def test_a_closed_connection_refuses_new_calls() -> None:
    conn: ClientConnection[str] = ClientConnection()
    conn.close(ProtocolViolation("gone"))
    try:
        conn.expect("a", "OpenImage")
    except ProtocolViolation as e:
        assert "gone" in e.message
    else:
        raise AssertionError("a call on a closed connection was accepted")
