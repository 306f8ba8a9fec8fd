"""The protocol's 32 KiB packet (README, docs/PROTOCOL.md: "one JSON request per SOCK_SEQPACKET packet (at most
32 KiB)"), at its exact boundary both ways: a request or reply of exactly 32 KiB is whole, one byte more is not.
Found by the mutation run (docs/TESTING.md): `>` made `>=` on either side survived."""

from __future__ import annotations

import json

from protocol.codec import decode_request, encode_reply
from protocol.errors import ProtocolViolation
from protocol.messages import Reply, Request
from tests.support.documented import PROTOCOL, number

PACKET = number(PROTOCOL, r"one JSON request per `SOCK_SEQPACKET` packet \(at most (\d+) KiB\)") * 1024


def request_of(size: int) -> bytes:
    base = json.dumps({"method": "OpenImage", "args": ["oci:/"]}).encode()
    data = json.dumps({"method": "OpenImage", "args": ["oci:/" + "x" * (size - len(base))]}).encode()
    assert len(data) == size
    return data


def test_a_request_of_exactly_32_kib_is_read_and_one_byte_more_is_refused() -> None:
    assert PACKET == 32768
    assert isinstance(decode_request(request_of(PACKET)), Request)
    refused = decode_request(request_of(PACKET + 1))
    assert isinstance(refused, ProtocolViolation) and f"exceeds the {PACKET} byte packet limit" in refused.message


def error_reply_of(size: int) -> tuple[Reply, str]:
    base = len(encode_reply(Reply.failure("")))
    text = "e" * (size - base)
    return Reply.failure(text), text


def test_an_error_reply_of_exactly_32_kib_is_sent_whole_and_a_longer_one_is_shortened_to_fit() -> None:
    reply, text = error_reply_of(PACKET)
    encoded = encode_reply(reply)
    assert len(encoded) == PACKET and json.loads(encoded)["error"] == text
    longer, text = error_reply_of(PACKET + 1000)
    encoded = encode_reply(longer)
    assert len(encoded) <= PACKET
    error = json.loads(encoded)["error"]
    assert text.startswith(error.rstrip(".… ")[:100]) and len(error) > PACKET - 200, "shortened, not emptied"


def test_a_successful_reply_of_exactly_32_kib_is_encoded() -> None:
    base = len(encode_reply(Reply.ok("")))
    value = "v" * (PACKET - base)
    encoded = encode_reply(Reply.ok(value))
    assert len(encoded) == PACKET and json.loads(encoded)["value"] == value
