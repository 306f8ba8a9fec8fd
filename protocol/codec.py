"""Bytes in, messages out (and back): the packet codec.

One JSON document per SOCK_SEQPACKET packet, at most ``MAX_MSG_SIZE`` bytes. Decoding never
raises past this module: whatever arrives, the caller gets a message or a ``ProtocolViolation``
it can turn into an error reply.
"""

from __future__ import annotations

import json
import re
from typing import Any

from protocol import MAX_MSG_SIZE
from protocol.errors import ErrorCode, ProtocolViolation, ProxyError
from protocol.messages import Reply, Request

#: the largest integer a request may carry (what the Go server and JavaScript can represent exactly)
MAX_SAFE_INTEGER = 2**53 - 1

_REPLY_KEYS = ("success", "value", "pipeid", "error_code", "error")


#: UTF-16 surrogates: a JSON text may carry them as lone ``\\udXXX`` escapes; UTF-8 cannot encode them
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


#: one encoder for every reply (``json.dumps`` with options builds a new one per call)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj``, for anything that reaches the wire (replies, the GetRawBlob error document).

    Total: strings that came from a client may hold lone surrogates (``"\\udcff"`` is valid JSON, and Python
    decodes it to a string UTF-8 cannot encode); each becomes U+FFFD, as Go's encoder writes invalid UTF-8."""
    text = _ENCODER.encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


def shown(value: Any, limit: int = 200) -> str:
    """A client's value quoted for an error text: JSON-quoted in ASCII (so control characters, lone surrogates and
    anything else outside ASCII are escapes, never raw bytes), showing at most ``limit`` characters of it (each
    written in at most 12: an astral character is two ``\\uXXXX`` escapes)."""
    text = value if isinstance(value, str) else None
    if text is not None and len(text) > limit:
        return json.dumps(text[:limit]) + f"... ({len(text)} characters)"
    try:
        quoted = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        quoted = f"<{json_type_name(value)}>"
    return quoted if len(quoted) <= limit + 2 else quoted[:limit] + "..."


_dumps = encode_json

#: a ``\\uD800``-``\\uDFFF`` escape in a request (a lone one decodes to a string no file name or UTF-8 text takes)
_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _without_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings replaced by U+FFFD, as Go's JSON decoder does, so that
    a client's string is always valid Unicode for what follows (paths, error texts). Iterative: the request may
    nest as deep as the decoder allowed."""

    def clean(text: str) -> str:
        return _LONE_SURROGATE.sub("\ufffd", text)

    def fix(item: Any) -> Any:
        if isinstance(item, str):
            return clean(item)
        return item

    root: list[Any] = [value]
    stack: list[list[Any] | dict[str, Any]] = [root]
    while stack:
        container = stack.pop()
        if isinstance(container, list):
            for index, item in enumerate(container):
                if isinstance(item, list | dict):
                    stack.append(item)
                else:
                    container[index] = fix(item)
        else:
            for key in list(container):
                item = container[key]
                cleaned_key = clean(key)
                if cleaned_key != key:
                    del container[key]
                    container[cleaned_key] = item
                if isinstance(item, list | dict):
                    stack.append(item)
                else:
                    container[cleaned_key] = fix(item)
    return root[0]


def decode_request(data: bytes, truncated: bool = False) -> Request | ProtocolViolation:
    """Decode one request packet. ``truncated`` says the kernel cut the packet (MSG_TRUNC).

    A violation found after a valid ``id`` was read carries that id, so its reply can too.
    """
    if truncated or len(data) > MAX_MSG_SIZE:
        return ProtocolViolation(f"invalid request: message exceeds the {MAX_MSG_SIZE} byte packet limit")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return ProtocolViolation(f"invalid request: not UTF-8: {e.reason} at byte {e.start}")
    except (ValueError, RecursionError) as e:
        return ProtocolViolation(f"invalid request: {_json_error_text(e)}")
    if b"\\u" in data and _LONE_SURROGATE_ESCAPE.search(data):
        doc = _without_lone_surrogates(doc)
    if not isinstance(doc, dict):
        return ProtocolViolation(f"invalid request: expected a JSON object, not {json_type_name(doc)}")
    request_id = None
    if "id" in doc:
        request_id = _request_id(doc["id"])
        if request_id is None:
            return ProtocolViolation(
                f'invalid request: "id" must be an integer from 0 to 2^53-1, not {shown(doc["id"], 100)}'
            )
    method = doc.get("method")
    if not isinstance(method, str):
        return ProtocolViolation(
            f'invalid request: "method" must be a string, not {json_type_name(method)}', request_id=request_id
        )
    args = doc.get("args")
    if args is None:
        args = []
    if not isinstance(args, list):
        return ProtocolViolation(
            f'invalid request: "args" must be an array, not {json_type_name(args)}', request_id=request_id
        )
    return Request(method=method, args=args, id=request_id)


def _request_id(value: Any) -> int | None:
    """A request id: a JSON integer (``7`` or ``7.0``) in [0, 2^53-1]; None if it is anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    if not 0 <= value <= MAX_SAFE_INTEGER:
        return None
    return int(value)


def _json_error_text(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON: {e.msg} at offset {e.pos}"
    if isinstance(e, RecursionError):
        return "malformed JSON: nested too deeply"
    return f"malformed JSON: {e}"


def json_type_name(value: Any) -> str:
    """The JSON type of a decoded value, for error texts."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def encode_reply(reply: Reply) -> bytes:
    """Encode a reply with all five keys in the Go server's order, within the packet limit.

    An error text too long for one packet is shortened (the reply must reach a client that
    receives into a 32 KiB buffer); a successful value that does not fit is a bug of the
    caller and raises ValueError.
    """
    doc = {
        "success": reply.success,
        "value": reply.value,
        "pipeid": reply.pipeid,
        "error_code": str(reply.error_code),
        "error": reply.error,
    }
    if reply.id is not None:
        doc["id"] = reply.id
    data = _dumps(doc)
    if len(data) <= MAX_MSG_SIZE:
        return data
    if reply.success:
        raise ValueError(f"reply of {len(data)} bytes exceeds the {MAX_MSG_SIZE} byte packet limit")
    doc["value"] = None
    text = reply.error
    while len(data) > MAX_MSG_SIZE:
        excess = len(data) - MAX_MSG_SIZE
        text = text[: max(0, len(text) - excess - 64)]
        doc["error"] = text + " [error text truncated]"
        data = _dumps(doc)
    return data


def encode_request(request: Request) -> bytes:
    doc: dict[str, Any] = {"method": request.method, "args": request.args}
    if request.id is not None:
        doc["id"] = request.id
    data = _dumps(doc)
    if len(data) > MAX_MSG_SIZE:
        raise ValueError(f"request of {len(data)} bytes exceeds the {MAX_MSG_SIZE} byte packet limit")
    return data


def decode_reply(data: bytes) -> Reply:
    """Decode a reply packet; raises ProtocolViolation for anything that is not a reply."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ProtocolViolation(f"invalid reply: {_json_error_text(e)}") from None
    if not isinstance(doc, dict):
        raise ProtocolViolation(f"invalid reply: expected a JSON object, not {json_type_name(doc)}")
    missing = [k for k in ("success", "value", "pipeid", "error") if k not in doc]
    if missing:
        raise ProtocolViolation(f"invalid reply: missing keys {missing}")
    success, pipeid, error = doc["success"], doc["pipeid"], doc["error"]
    if not isinstance(success, bool):
        raise ProtocolViolation('invalid reply: "success" is not a boolean')
    if not isinstance(pipeid, int) or isinstance(pipeid, bool) or not 0 <= pipeid < 2**32:
        raise ProtocolViolation(f"invalid reply: bad pipeid {pipeid!r}")
    if not isinstance(error, str):
        raise ProtocolViolation('invalid reply: "error" is not a string')
    raw_code = doc.get("error_code", "")
    try:
        code = ErrorCode(raw_code)
    except ValueError:
        code = ErrorCode.OTHER
    if not success and code is ErrorCode.NONE:
        code = ErrorCode.OTHER
    request_id = None
    if "id" in doc:
        request_id = _request_id(doc["id"])
        if request_id is None:
            raise ProtocolViolation(f"invalid reply: bad id {doc['id']!r}")
    return Reply(success=success, value=doc["value"], pipeid=pipeid, error_code=code, error=error, id=request_id)


def encode_error_document(error: ProxyError) -> bytes:
    """What GetRawBlob writes to its error fd: ``{"code": ..., "message": ...}``."""
    return encode_json({"code": str(error.code), "message": error.message})


def decode_error_document(data: bytes) -> ProxyError:
    """The error a GetRawBlob error fd carried; ProtocolViolation when it is not such a document."""
    try:
        doc = json.loads(data)
        code = ErrorCode(doc.get("code", "other"))
        message = str(doc.get("message", ""))
    except (ValueError, AttributeError, RecursionError):
        raise ProtocolViolation(f"GetRawBlob: unparsable error document {data[:200]!r}") from None
    return ProxyError(message, code)


__all__ = [
    "MAX_MSG_SIZE",
    "MAX_SAFE_INTEGER",
    "decode_error_document",
    "decode_reply",
    "decode_request",
    "encode_error_document",
    "encode_json",
    "encode_reply",
    "encode_request",
    "json_type_name",
    "shown",
]
