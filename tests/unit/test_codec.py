"""The packet codec: bytes in, messages out; never an exception past the codec."""

import json

from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import (
    MAX_MSG_SIZE,
    decode_reply,
    decode_request,
    encode_json,
    encode_reply,
    encode_request,
    shown,
)
from protocol.errors import ErrorCode, ProtocolViolation, ProxyError
from protocol.messages import Reply, Request
from protocol.methods import parse_args

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def test_reply_has_all_five_keys_in_go_order():
    data = encode_reply(Reply.ok("0.2.8"))
    assert data == b'{"success":true,"value":"0.2.8","pipeid":0,"error_code":"","error":""}'


def test_error_reply_carries_code_and_text():
    doc = json.loads(encode_reply(Reply.failure("no image 3", ErrorCode.OTHER)))
    assert doc == {"success": False, "value": None, "pipeid": 0, "error_code": "other", "error": "no image 3"}


def test_oversized_error_text_is_shortened_to_fit_one_packet():
    data = encode_reply(Reply.failure("x" * (3 * MAX_MSG_SIZE)))
    assert len(data) <= MAX_MSG_SIZE
    assert json.loads(data)["error"].endswith("[error text truncated]")


def test_oversized_success_value_is_refused():
    try:
        encode_reply(Reply.ok(["x" * 100] * 1000))
    except ValueError as e:
        assert "packet limit" in str(e)
    else:
        raise AssertionError("a reply over 32 KiB must not be encoded")


def test_null_and_missing_args_decode_to_empty_list():
    assert decode_request(b'{"method":"Initialize","args":null}') == Request("Initialize", [])
    assert decode_request(b'{"method":"Initialize"}') == Request("Initialize", [])


def test_malformed_json_names_the_problem():
    result = decode_request(b'{"method":')
    assert isinstance(result, ProtocolViolation)
    assert result.message.startswith("invalid request: malformed JSON")


def test_wrong_shapes_are_violations():
    assert "array" in decode_request(b'{"method":"X","args":{}}').message
    assert "method" in decode_request(b'{"method":5,"args":[]}').message
    assert "object" in decode_request(b"[1,2]").message
    assert "UTF-8" in decode_request(b'{"method":"\xff"}').message


def test_truncated_packet_is_a_violation():
    result = decode_request(b"{}", truncated=True)
    assert isinstance(result, ProtocolViolation)
    assert "32768" in result.message


def test_deeply_nested_json_does_not_raise():
    result = decode_request(b"[" * 100000 + b"]" * 100000)
    assert isinstance(result, ProtocolViolation)


@given(st.binary(max_size=512))
def test_decoder_never_raises_on_bytes(data):
    result = decode_request(data)
    assert isinstance(result, Request | ProtocolViolation)


@given(json_values)
def test_decoder_never_raises_on_any_json(doc):
    result = decode_request(json.dumps(doc).encode())
    assert isinstance(result, Request | ProtocolViolation)
    if isinstance(result, Request):
        assert isinstance(result.method, str) and isinstance(result.args, list)


@given(st.text(max_size=40), st.lists(json_values, max_size=5))
def test_request_roundtrip(method, args):
    request = Request(method, args)
    try:
        data = encode_request(request)
    except ValueError:
        return
    decoded = decode_request(data)
    assert decoded == Request(method, json.loads(json.dumps(args)))


@given(st.booleans(), json_values, st.integers(0, 2**32 - 1), st.sampled_from(list(ErrorCode)), st.text())
def test_reply_roundtrip(success, value, pipeid, code, error):
    reply = Reply(success=success, value=value, pipeid=pipeid, error_code=code, error=error)
    try:
        data = encode_reply(reply)
    except ValueError:
        return
    decoded = decode_reply(data)
    assert decoded.success == success and decoded.pipeid == pipeid
    if decoded.error == error:
        assert decoded.value == json.loads(json.dumps(value))


def test_reply_without_error_code_from_old_servers():
    reply = decode_reply(b'{"success":false,"value":null,"pipeid":0,"error":"boom"}')
    assert reply.error_code is ErrorCode.OTHER and reply.error == "boom"


def test_reply_missing_keys_is_rejected():
    try:
        decode_reply(b'{"success":true}')
    except ProtocolViolation as e:
        assert "missing keys" in e.message
    else:
        raise AssertionError("reply without value/pipeid/error accepted")


# --------------------------------------------------------------------------- request-ids extension

request_ids = st.none() | st.integers(0, 2**53 - 1)


@given(st.text(max_size=40), st.lists(json_values, max_size=3), request_ids)
def test_request_id_roundtrip(method, args, request_id):
    try:
        data = encode_request(Request(method, args, id=request_id))
    except ValueError:
        return
    decoded = decode_request(data)
    assert isinstance(decoded, Request) and decoded.id == request_id
    assert ("id" in json.loads(data)) == (request_id is not None)


@given(st.booleans(), request_ids, st.text(max_size=50_000))
def test_reply_id_is_the_sixth_key_and_survives_error_shortening(success, request_id, error):
    reply = Reply(success=success, error=error if not success else "", id=request_id)
    data = encode_reply(reply)
    assert len(data) <= MAX_MSG_SIZE
    keys = list(json.loads(data))
    assert keys == ["success", "value", "pipeid", "error_code", "error"] + (["id"] if request_id is not None else [])
    assert decode_reply(data).id == request_id


def test_a_violation_after_a_valid_id_carries_it():
    violation = decode_request(b'{"id": 9, "method": 3}')
    assert isinstance(violation, ProtocolViolation) and violation.request_id == 9
    violation = decode_request(b'{"id": -9, "method": "GetManifest"}')
    assert isinstance(violation, ProtocolViolation) and violation.request_id is None


# -- a total codec: whatever a client's JSON holds, every reply encodes (issue 13) --------------------------------

#: any code point, lone surrogates included (hypothesis leaves them out of text() unless asked)
any_text = st.text(st.characters(exclude_categories=()), max_size=60)
hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)


def _assert_wire_reply(data: bytes) -> Reply:
    assert len(data) <= MAX_MSG_SIZE
    data.decode("utf-8")  # strict: never invalid UTF-8 on the wire
    return decode_reply(data)


@given(any_text, st.lists(hostile_values, max_size=4))
def test_every_request_json_text_gets_an_encodable_error_reply(method, args):
    # the request as a client may write it: lone surrogates travel as \\udXXX escapes, which is valid JSON
    packet = json.dumps({"method": method, "args": args}).encode()
    decoded = decode_request(packet)
    if isinstance(decoded, ProtocolViolation):
        error = decoded.message
    else:
        try:
            parse_args(decoded)
        except ProtocolViolation as e:
            error = e.message
        else:
            error = f"echo {decoded.method} {decoded.args!r}"
    reply = _assert_wire_reply(encode_reply(Reply.failure(error + method)))
    assert not reply.success


@given(st.text(st.characters(exclude_categories=()), max_size=20_000), request_ids)
def test_error_text_with_any_code_points_encodes_within_a_packet(error, request_id):
    reply = _assert_wire_reply(
        encode_reply(Reply(success=False, error=error, error_code=ErrorCode.OTHER, id=request_id))
    )
    assert reply.id == request_id
    assert "\ud800" not in reply.error  # a lone surrogate arrives as U+FFFD


def test_lone_surrogate_becomes_replacement_character():
    data = encode_reply(Reply.failure('no image "\udcff" here'))
    assert _assert_wire_reply(data).error == 'no image "\ufffd" here'


def test_nul_and_control_characters_are_escaped_not_raw():
    data = encode_reply(Reply.failure("a\x00b\x1bc"))
    assert b"\x00" not in data and b"\x1b" not in data
    assert _assert_wire_reply(data).error == "a\x00b\x1bc"


@given(hostile_values)
def test_encode_json_is_total(value):
    json.loads(encode_json(value).decode("utf-8"))


@given(hostile_values, st.integers(1, 300))
def test_shown_is_bounded_and_encodable(value, limit):
    text = shown(value, limit)
    assert len(text) <= 12 * limit + 40  # at most ``limit`` characters shown, each at most a 12-character escape
    assert text.isascii()
    encode_json(text).decode("utf-8")


def test_shown_survives_deep_nesting():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert shown(deep) == "<array>"


def test_raw_blob_error_document_encodes_any_text():
    from protocol.codec import encode_error_document as encode_error_fd_payload

    payload = json.loads(encode_error_fd_payload(ProxyError("bad \udcff digest")).decode("utf-8"))
    assert payload == {"code": "other", "message": "bad \ufffd digest"}


@given(any_text)
def test_log_lines_are_printable_whatever_the_client_sent(text):
    import logging

    from proxy.server.logs import OneLineFormatter

    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "client sent %s", (text,), None)
    line = OneLineFormatter(journald=True).format(record)
    line.encode("utf-8")  # never a lone surrogate
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line


def test_lone_surrogates_in_requests_become_replacement_characters_as_in_go():
    # Go's decoder turns an unpaired surrogate escape into U+FFFD; so do we, so a path or a text built from a
    # client's string is always valid Unicode (a lone surrogate made os.open raise, an "internal error")
    decoded = decode_request(b'{"method":"OpenImage","args":["oci:/tmp/\\ud800", {"k\\udfff": ["\\udcff"]}]}')
    assert isinstance(decoded, Request)
    assert decoded.args == ["oci:/tmp/\ufffd", {"k\ufffd": ["\ufffd"]}]
    paired = decode_request(b'{"method":"OpenImage","args":["\\ud83d\\ude00"]}')
    assert isinstance(paired, Request) and paired.args == ["\U0001f600"]


@given(st.lists(hostile_values, max_size=4))
def test_decoded_requests_hold_only_valid_unicode(args):
    decoded = decode_request(json.dumps({"method": "M", "args": args}).encode())
    assert isinstance(decoded, Request)
    json.dumps(decoded.args, ensure_ascii=False).encode("utf-8")  # strict: no lone surrogate survived
