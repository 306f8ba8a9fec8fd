"""Fuzz target: request packets through the codec and the argument checks, and error replies back out.

Input: one request packet, any bytes. Invariants:

* ``codec.decode_request`` never raises: it returns a ``Request`` or a ``ProtocolViolation`` (also for a
  packet the kernel truncated);
* ``methods.parse_args`` raises nothing but ``ProxyError`` (``ProtocolViolation`` is one);
* ``codec.encode_reply`` of an error reply whose text holds any string the request carried (method, string
  arguments, the error text, the packet decoded with lone surrogates for its invalid bytes), with or without
  the request's id, never raises and gives valid UTF-8 JSON of at most 32 KiB that ``decode_reply`` reads
  back as that failure.

Run: ``python -m tests.fuzz.fuzz_request [libFuzzer flags] tests/fuzz/corpus/fuzz_request``.
"""

from __future__ import annotations

import json

import atheris

from tests.fuzz import _common

with atheris.instrument_imports(include=["protocol"]):
    from protocol import codec, methods
    from protocol.errors import ErrorCode, ProtocolViolation, ProxyError
    from protocol.messages import Reply, Request

_KEYS = ["success", "value", "pipeid", "error_code", "error"]


def check_error_reply(text: str, request_id: int | None) -> None:
    reply = Reply(success=False, error=text, error_code=ErrorCode.OTHER, id=request_id)
    data = codec.encode_reply(reply)
    assert len(data) <= codec.MAX_MSG_SIZE, f"reply of {len(data)} bytes"
    doc = json.loads(data.decode("utf-8"))  # strict UTF-8: a lone surrogate must not reach the wire
    assert list(doc)[:5] == _KEYS, list(doc)
    assert doc["success"] is False and isinstance(doc["error"], str) and doc["error"]
    back = codec.decode_reply(data)
    assert not back.success and back.error_code is ErrorCode.OTHER and back.id == request_id, back


def strings_in(value: object) -> list[str]:
    """The strings of a decoded JSON value (a few levels deep: the codec caps what it echoes anyway)."""
    found: list[str] = []
    stack = [value]
    while stack and len(found) < 20:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                found.append(key)
                stack.append(inner)
    return found


def test_one_input(data: bytes) -> None:
    truncated = codec.decode_request(data, truncated=True)
    assert isinstance(truncated, ProtocolViolation), truncated

    decoded = codec.decode_request(data)
    texts = [data.decode("utf-8", "surrogateescape")]
    if isinstance(decoded, Request):
        assert isinstance(decoded.method, str) and isinstance(decoded.args, list), decoded
        request_id = decoded.id
        texts.append(decoded.method)
        texts.extend(strings_in(decoded.args))
        try:
            methods.parse_args(decoded)
        except ProxyError as e:
            texts.append(str(e))
    else:
        assert isinstance(decoded, ProtocolViolation), type(decoded)
        request_id = decoded.request_id
        texts.append(str(decoded))
    if request_id is not None:
        assert isinstance(request_id, int) and 0 <= request_id <= codec.MAX_SAFE_INTEGER, request_id
    for text in texts:
        check_error_reply(f"invalid request: {text}", request_id)
        check_error_reply(text or "x", None)


def main() -> None:
    _common.run("fuzz_request", test_one_input)


if __name__ == "__main__":
    main()
