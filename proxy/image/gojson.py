"""Go ``encoding/json`` compatibility: byte-exact Marshal, and Unmarshal into Go-typed schemas.

The proxy hands clients JSON that the Go server produced with ``json.Marshal`` (converted
manifests, re-serialized configs); clients hash some of it, so the bytes must match exactly.

* ``marshal(obj)`` (from ``proxy.image.gomarshal``, re-exported): dicts are Go structs, ``GoMap`` Go maps.
* ``unmarshal(data, schema)``: decode JSON the way ``json.Unmarshal`` fills a Go value of the
  given type: case-insensitive field matching (exact match preferred), unknown fields dropped,
  ``null`` leaving non-nullable values alone, maps merged on duplicate keys, type mismatches
  rejected, invalid UTF-8 replaced by U+FFFD byte by byte. Input nested deeper than
  ``proxy.common.jsonlimits.MAX_DEPTH`` levels is refused with ``GoJSONNestingError`` before it is parsed.
* ``format_go_time(s)``: an RFC 3339 timestamp re-serialized like ``time.Time.MarshalJSON``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

import attrs

from proxy.common import jsonlimits
from proxy.image.gomarshal import GoJSONError, GoJSONNestingError, GoMap, go_quote, marshal, sanitize_utf8

__all__ = [
    "ANY",
    "BOOL",
    "BYTES",
    "INT",
    "STRING",
    "TIME",
    "EmptyStruct",
    "Field",
    "GoJSONError",
    "GoJSONNestingError",
    "GoMap",
    "ListOf",
    "MapOf",
    "PtrTo",
    "Struct",
    "format_go_time",
    "go_quote",
    "marshal",
    "unmarshal",
]


# --------------------------------------------------------------------------------------------
# Unmarshal


@attrs.frozen
class _Scalar:
    name: str  # "string", "bool", "int64", "[]uint8", "interface {}", "*time.Time"


STRING = _Scalar("string")
BOOL = _Scalar("bool")
INT = _Scalar("int64")
BYTES = _Scalar("[]uint8")
ANY = _Scalar("interface {}")
TIME = _Scalar("*time.Time")  # decodes to the re-serialized (MarshalJSON) text


@attrs.frozen
class ListOf:
    elem: Any


@attrs.frozen
class MapOf:
    elem: Any


@attrs.frozen
class PtrTo:
    elem: Struct


@attrs.frozen
class EmptyStruct:
    """Go ``struct{}``: any object decodes into it, nothing is kept."""


@attrs.frozen
class Field:
    json_name: str
    type: Any
    omitempty: bool = False


@attrs.frozen
class Struct:
    name: str
    fields: tuple[Field, ...]

    def zero(self) -> dict[str, Any]:
        return {f.json_name: _zero(f.type) for f in self.fields}

    def lookup(self, key: str) -> Field | None:
        for f in self.fields:
            if f.json_name == key:
                return f
        folded = _fold(key)
        for f in self.fields:
            if _fold(f.json_name) == folded:
                return f
        return None


def _zero(t: Any) -> Any:
    if t is STRING:
        return ""
    if t is BOOL:
        return False
    if t is INT:
        return 0
    if isinstance(t, Struct):
        return t.zero()
    if isinstance(t, EmptyStruct):
        return {}
    return None  # pointers, slices, maps, interfaces, []byte


def _fold(s: str) -> str:
    """Go's JSON field-name folding: ToUpper(ToLower(r)) per rune (simple mappings only)."""
    out = []
    for c in s:
        if c < "\x80":
            out.append(c.upper())
            continue
        if c == "\u0130":  # İ lowers to i in Go's simple mapping
            out.append("I")
            continue
        lo = c.lower()
        if len(lo) != 1:
            lo = c
        up = lo.upper()
        out.append(up if len(up) == 1 else lo)
    return "".join(out)


class _FloatLiteral(str):
    """A JSON number literal with a fraction or exponent (Go rejects it for integer fields)."""


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in document order, duplicates kept."""


def _go_decode_utf8(data: bytes) -> str:
    # Go replaces each invalid byte by U+FFFD (one per byte, unlike Python's "replace").
    out: list[str] = []
    pos = 0
    n = len(data)
    while pos < n:
        try:
            out.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            out.append(data[pos : pos + e.start].decode("utf-8"))
            out.append("\ufffd")
            pos += e.start + 1
    return "".join(out)


def _no_constants(name: str) -> Any:
    raise GoJSONError(f"invalid character {name[0]!r} looking for beginning of value")


def parse_json(data: bytes, max_depth: int = jsonlimits.MAX_DEPTH) -> Any:
    """Parse JSON text like Go's scanner accepts it; objects become ``_Pairs``.

    Raises ``GoJSONNestingError`` when arrays and objects nest deeper than ``max_depth``.
    """
    try:
        jsonlimits.check_json_depth(data, max_depth)
    except jsonlimits.NestingError as e:
        raise GoJSONNestingError(str(e)) from None
    text = _go_decode_utf8(data)
    try:
        return json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_float=_FloatLiteral,
            parse_constant=_no_constants,
        )
    except json.JSONDecodeError as e:
        if not text.strip():
            raise GoJSONError("unexpected end of JSON input") from None
        raise GoJSONError(f"invalid JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:  # not expected below the depth limit
        raise GoJSONNestingError(str(jsonlimits.NestingError(max_depth))) from None


def _json_kind(v: Any) -> str:
    if isinstance(v, _Pairs):
        return "object"
    if isinstance(v, list):
        return "array"
    if isinstance(v, str) and not isinstance(v, _FloatLiteral):
        return "string"
    if isinstance(v, bool):
        return "bool"
    if v is None:
        return "null"
    return "number"


def _type_name(t: Any) -> str:
    if isinstance(t, _Scalar):
        return t.name
    if isinstance(t, ListOf):
        return "[]" + _type_name(t.elem)
    if isinstance(t, MapOf):
        return "map[string]" + _type_name(t.elem)
    if isinstance(t, PtrTo):
        return "*" + t.elem.name
    if isinstance(t, EmptyStruct):
        return "struct {}"
    if isinstance(t, Struct):
        return t.name
    return "?"


def _type_error(v: Any, t: Any, path: str) -> GoJSONError:
    what = _json_kind(v)
    if what == "number":
        what = f"number {v}"
    where = f"Go struct field {path}" if path else "Go value"
    return GoJSONError(f"json: cannot unmarshal {what} into {where} of type {_type_name(t)}")


def _decode(v: Any, t: Any, current: Any, path: str) -> Any:
    if v is None:
        # null: nil for pointers, slices, maps, interfaces, []byte; no-op for the rest
        if isinstance(t, ListOf | MapOf | PtrTo) or t in (ANY, BYTES, TIME):
            return None
        return current
    if t is STRING:
        if _json_kind(v) != "string":
            raise _type_error(v, t, path)
        return sanitize_utf8(v)
    if t is BOOL:
        if not isinstance(v, bool):
            raise _type_error(v, t, path)
        return v
    if t is INT:
        if isinstance(v, bool) or not isinstance(v, int) or not -(2**63) <= v < 2**63:
            raise _type_error(v, t, path)
        return v
    if t is BYTES:
        if _json_kind(v) != "string":
            raise _type_error(v, t, path)
        try:
            return base64.b64decode(v.replace("\r", "").replace("\n", ""), validate=True)
        except ValueError:
            raise GoJSONError(f"illegal base64 data in {path or 'value'}") from None
    if t is TIME:
        if _json_kind(v) != "string":
            raise GoJSONError("Time.UnmarshalJSON: input is not a JSON string")
        return format_go_time(v)
    if t is ANY:
        return _to_plain(v)
    if isinstance(t, ListOf):
        if not isinstance(v, list) or isinstance(v, _Pairs):
            raise _type_error(v, t, path)
        return [_decode(e, t.elem, _zero(t.elem), path) for e in v]
    if isinstance(t, MapOf):
        if not isinstance(v, _Pairs):
            raise _type_error(v, t, path)
        result = dict(current) if current is not None else {}
        for k, e in v:
            result[sanitize_utf8(k)] = _decode(e, t.elem, _zero(t.elem), path)
        return result
    if isinstance(t, EmptyStruct):
        if not isinstance(v, _Pairs):
            raise _type_error(v, t, path)
        return {}
    if isinstance(t, PtrTo):
        base = current if current is not None else t.elem.zero()
        return _decode(v, t.elem, base, path)
    if isinstance(t, Struct):
        if not isinstance(v, _Pairs):
            raise _type_error(v, t, path)
        result = dict(current)
        for k, e in v:
            f = t.lookup(sanitize_utf8(k))
            if f is None:
                continue
            sub = f"{path}.{f.json_name}" if path else f"{t.name}.{f.json_name}"
            result[f.json_name] = _decode(e, f.type, result[f.json_name], sub)
        return result
    raise TypeError(f"unknown schema type {t!r}")


def _to_plain(v: Any) -> Any:
    """A decoded ``interface{}`` value: map[string]any / []any / float64 / string / bool / nil."""
    if isinstance(v, _Pairs):
        return {sanitize_utf8(k): _to_plain(e) for k, e in v}
    if isinstance(v, list):
        return [_to_plain(e) for e in v]
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | _FloatLiteral):
        f = float(v)
        if math.isinf(f):
            raise GoJSONError(f"json: cannot unmarshal number {v} into Go value of type float64")
        return f
    return sanitize_utf8(v)


def unmarshal(data: bytes, schema: Any, max_depth: int = jsonlimits.MAX_DEPTH) -> Any:
    """Decode ``data`` as Go's ``json.Unmarshal`` fills a zero value of ``schema``.

    Structs become dicts keyed by JSON field names (all fields present, zero values filled in),
    ``TIME`` values come back as their re-serialized text. Raises ``GoJSONError``; its subclass
    ``GoJSONNestingError`` for input nested deeper than ``max_depth`` (Go allows 10000 levels; no
    manifest, config or index needs more than a few, see ``proxy.common.jsonlimits``).
    """
    return _decode(parse_json(data, max_depth), schema, _zero(schema), "")


def encode_value(value: Any, t: Any) -> Any:
    """Turn a decoded value of type ``t`` back into what ``marshal`` needs (omitempty applied)."""
    if value is None:
        return None
    if isinstance(t, MapOf):
        return GoMap({k: encode_value(e, t.elem) for k, e in value.items()})
    if isinstance(t, ListOf):
        return [encode_value(e, t.elem) for e in value]
    if isinstance(t, PtrTo):
        return encode_value(value, t.elem)
    if isinstance(t, Struct):
        out: dict[str, Any] = {}
        for f in t.fields:
            fv = value[f.json_name]
            if f.omitempty and _is_empty(fv, f.type):
                continue
            out[f.json_name] = encode_value(fv, f.type)
        return out
    if isinstance(t, EmptyStruct):
        return {}
    if t is ANY:
        return _plain_to_marshal(value)
    return value


def _plain_to_marshal(v: Any) -> Any:
    if isinstance(v, dict):
        return GoMap({k: _plain_to_marshal(e) for k, e in v.items()})
    if isinstance(v, list):
        return [_plain_to_marshal(e) for e in v]
    return v


def _is_empty(v: Any, t: Any) -> bool:
    # Go's omitempty: false, 0, "", nil pointer/interface, and empty (or nil) map, slice, array.
    # Structs are never empty.
    if isinstance(t, Struct | EmptyStruct):
        return False
    if v is None:
        return True
    if t is BOOL:
        return v is False
    if t is INT:
        return v == 0
    if t in (STRING, BYTES) or isinstance(t, ListOf | MapOf):
        return len(v) == 0
    return False


# --------------------------------------------------------------------------------------------
# time.Time


_TIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{1,2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def _days_in(month: int, year: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def format_go_time(s: str) -> str:
    """Parse ``s`` like Go's ``time.Time.UnmarshalJSON`` and re-serialize like ``MarshalJSON``.

    RFC 3339 (Go also accepts a one-digit hour and ',' before the fraction); the fraction is
    cut to nanoseconds and its trailing zeros trimmed, a zero offset becomes "Z". Raises
    ``GoJSONError`` for what Go rejects.
    """
    m = _TIME_RE.fullmatch(s)
    if m is None:
        raise GoJSONError(f"parsing time {go_quote(s)} as {go_quote('2006-01-02T15:04:05Z07:00')}: cannot parse")
    year, month, day, hour, minute, sec = (int(m.group(i)) for i in range(1, 7))
    frac, zone = m.group(7), m.group(8)
    bad = None
    if not 1 <= month <= 12:
        bad = "month"
    elif not 1 <= day <= _days_in(month, year):
        bad = "day"
    elif hour > 23:
        bad = "hour"
    elif minute > 59:
        bad = "minute"
    elif sec > 59:
        bad = "second"
    off_h = off_m = 0
    if zone != "Z":
        off_h, off_m = int(zone[1:3]), int(zone[4:6])
        if off_h > 24:
            bad = bad or "time zone offset hour"
        if off_m > 60:
            bad = bad or "time zone offset minute"
    if bad:
        raise GoJSONError(f"parsing time {go_quote(s)}: {bad} out of range")
    nanos = (frac or "")[:9].ljust(9, "0").rstrip("0")
    out = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{sec:02d}"
    if nanos:
        out += "." + nanos
    total = off_h * 60 + off_m
    if total == 0:
        return out + "Z"
    sign = zone[0]
    return out + f"{sign}{total // 60:02d}:{total % 60:02d}"
