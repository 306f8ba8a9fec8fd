"""Go ``encoding/json`` Marshal, byte for byte, and Go's ``%q``; the error type of both directions of
``proxy.image.gojson``.

Dicts are Go structs (keys in the given order); Go maps are wrapped in ``GoMap`` (keys sorted by their UTF-8
bytes, as Go does). Strings are escaped the way Go escapes them."""

from __future__ import annotations

import base64
import decimal
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any


class GoJSONError(ValueError):
    """The input cannot be decoded into the Go type, or a value cannot be marshalled."""


class GoJSONNestingError(GoJSONError):
    """The input nests deeper than the limit (``JSON nested too deeply (over 64 levels)``): refused before it is
    parsed, so that neither the parser nor the decoding recurses without bound."""


# --------------------------------------------------------------------------------------------
# Marshal


class GoMap(Mapping[str, Any]):
    """A Go map value: marshalled with its keys sorted (by UTF-8 bytes, like Go)."""

    __slots__ = ("_d",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._d: dict[str, Any] = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"GoMap({self._d!r})"


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",  # Go >= 1.22
    "\f": "\\f",  # Go >= 1.22
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_NEEDS_ESCAPE = re.compile('["\\\\<>&\u2028\u2029\x00-\x1f\ud800-\udfff]')


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    esc = _ESCAPES.get(c)
    if esc is not None:
        return esc
    if "\ud800" <= c <= "\udfff":
        # A lone surrogate stands for invalid UTF-8: Go writes the escape text \ufffd.
        return "\\ufffd"
    return f"\\u{ord(c):04x}"


def _encode_string(s: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, s) + '"'


def sanitize_utf8(s: str) -> str:
    """Replace lone surrogates (undecodable input) by U+FFFD, as Go strings would hold."""
    return re.sub("[\ud800-\udfff]", "\ufffd", s)


def _format_float(f: float) -> str:
    """Go's float64 encoding: shortest digits, 'f' format unless < 1e-6 or >= 1e21."""
    if math.isnan(f) or math.isinf(f):
        raise GoJSONError(f"json: unsupported value: {f!r}")
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    sign_bit, digit_tuple, exponent = decimal.Decimal(repr(f)).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent = int(exponent) + (len(digit_tuple) - len(digits))
    point = len(digits) + exponent  # position of the decimal point within `digits`
    sign = "-" if sign_bit else ""
    a = abs(f)
    if a < 1e-6 or a >= 1e21:
        e = point - 1
        m = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        es = f"{abs(e):02d}"
        if e < 0 and len(es) == 2 and es[0] == "0":
            es = es[1:]  # Go cleans up e-09 to e-9
        return f"{sign}{m}e{'-' if e < 0 else '+'}{es}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _marshal(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_encode_string(obj))
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(_format_float(obj))
    elif isinstance(obj, GoMap):
        items = sorted(obj.items(), key=lambda kv: sanitize_utf8(kv[0]).encode("utf-8"))
        _marshal_object(items, out)
    elif isinstance(obj, Mapping):
        _marshal_object(list(obj.items()), out)
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(",")
            _marshal(v, out)
        out.append("]")
    elif isinstance(obj, bytes | bytearray):
        out.append('"' + base64.b64encode(bytes(obj)).decode("ascii") + '"')
    else:
        raise GoJSONError(f"json: unsupported type: {type(obj).__name__}")


def _marshal_object(items: list[tuple[Any, Any]], out: list[str]) -> None:
    out.append("{")
    for i, (k, v) in enumerate(items):
        if not isinstance(k, str):
            raise GoJSONError(f"json: unsupported key type: {type(k).__name__}")
        if i:
            out.append(",")
        out.append(_encode_string(k))
        out.append(":")
        _marshal(v, out)
    out.append("}")


def marshal(obj: Any) -> bytes:
    """What Go's ``json.Marshal`` returns for the equivalent value.

    dict/Mapping = struct (given key order), ``GoMap`` = map (sorted keys), list/tuple = slice,
    bytes = []byte (base64), None = nil, int/float/bool/str as their Go counterparts.
    """
    out: list[str] = []
    _marshal(obj, out)
    return "".join(out).encode("utf-8", "surrogatepass")


def go_quote(s: str) -> str:
    """Go's ``%q`` / ``strconv.Quote`` for error texts (printable characters kept)."""
    parts = ['"']
    for c in s:
        o = ord(c)
        if c == '"':
            parts.append('\\"')
        elif c == "\\":
            parts.append("\\\\")
        elif c in "\a\b\f\n\r\t\v":
            parts.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, "\\v"))
        elif 0xD800 <= o <= 0xDFFF:
            parts.append("\\ufffd")
        elif c.isprintable() or c == " ":
            parts.append(c)
        elif o < 0x80:
            parts.append(f"\\x{o:02x}")
        elif o <= 0xFFFF:
            parts.append(f"\\u{o:04x}")
        else:
            parts.append(f"\\U{o:08x}")
    parts.append('"')
    return "".join(parts)


__all__ = ["GoJSONError", "GoJSONNestingError", "GoMap", "go_quote", "marshal", "sanitize_utf8"]
