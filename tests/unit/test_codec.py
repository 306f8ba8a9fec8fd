"""The packet codec: bytes in, messages out; never an exception past the codec."""

import json

from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import MAX_MSG_SIZE, decode_reply, decode_request, encode_reply, encode_request
from protocol.errors import ErrorCode, ProtocolViolation
from protocol.messages import Reply, Request

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
