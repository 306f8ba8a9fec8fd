"""proxy.image.gojson: Go encoding/json Marshal bytes, typed Unmarshal, time.Time re-serialization."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.image import gojson
from proxy.image.gojson import (
    BOOL,
    INT,
    STRING,
    TIME,
    Field,
    GoJSONError,
    GoMap,
    ListOf,
    MapOf,
    PtrTo,
    Struct,
    format_go_time,
    go_quote,
    marshal,
)


def test_struct_keys_keep_their_order_and_maps_are_sorted_by_bytes():
    doc = {"z": 1, "a": GoMap({"b": True, "B": None, "é": 1, "a": [1, "x"]})}
    assert marshal(doc) == '{"z":1,"a":{"B":null,"a":[1,"x"],"b":true,"é":1}}'.encode()


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("<a&b>", r'"\u003ca\u0026b\u003e"'),
        ("\u2028\u2029", r'"\u2028\u2029"'),
        ("\n\r\t\b\f\x01\x1f", r'"\n\r\t\b\f\u0001\u001f"'),
        ('"\\', r'"\"\\"'),
        ("é\x7f😀", '"é\x7f😀"'),
        ("\ud800", r'"\ufffd"'),  # a lone surrogate stands for invalid UTF-8
        ("\ufffd", '"\ufffd"'),  # a real U+FFFD stays raw
    ],
)
def test_strings_are_escaped_like_go(text, encoded):
    assert marshal(text) == encoded.encode()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (-0.0, "-0"),
        (0.1, "0.1"),
        (100.0, "100"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-10, "1.5e-10"),
        (123456789.125, "123456789.125"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
    ],
)
def test_floats_are_formatted_like_go(value, text):
    assert marshal(value) == text.encode()


def test_nan_is_rejected():
    with pytest.raises(GoJSONError):
        marshal(float("nan"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _normalized(value):
    """Numbers as floats, lone surrogates as U+FFFD: what survives a Go round trip."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return gojson.sanitize_utf8(value)
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return {gojson.sanitize_utf8(k): _normalized(v) for k, v in value.items()}


@given(json_values)
def test_marshal_is_compact_valid_json_of_the_same_value(value):
    data = marshal(value)
    assert b"\n" not in data and not data.startswith(b" ")
    assert _normalized(json.loads(data, parse_int=float)) == _normalized(value)


@pytest.mark.parametrize(
    ("given_text", "expected"),
    [
        ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05Z"),
        ("2024-01-02T03:04:05.120000000Z", "2024-01-02T03:04:05.12Z"),
        ("2024-01-02T03:04:05.000Z", "2024-01-02T03:04:05Z"),
        ("2024-01-02T03:04:05.1234567891234+00:00", "2024-01-02T03:04:05.123456789Z"),
        ("2024-01-02T03:04:05-00:00", "2024-01-02T03:04:05Z"),
        ("2024-01-02T03:04:05+01:30", "2024-01-02T03:04:05+01:30"),
        ("2024-01-02T3:04:05,5-07:00", "2024-01-02T03:04:05.5-07:00"),
        ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
        ("0000-02-29T00:00:00Z", "0000-02-29T00:00:00Z"),
    ],
)
def test_times_are_reserialized_like_go(given_text, expected):
    assert format_go_time(given_text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "2024-01-02",
        "2024-01-02 03:04:05Z",
        "2024-01-02t03:04:05Z",
        "2024-01-02T03:04:05z",
        "2023-02-29T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-01-02T24:00:00Z",
        "2024-01-02T03:04:60Z",
        "2024-01-02T03:04:05",
        "2024-01-02T03:04:05.Z",
        "2024-01-02T03:04:05+0100",
        "\uff12\uff1024-01-02T03:04:05Z",  # fullwidth digits are not ASCII digits
    ],
)
def test_times_go_rejects_are_rejected(bad):
    with pytest.raises(GoJSONError):
        format_go_time(bad)


INNER = Struct(
    "Inner", (Field("User", STRING, True), Field("Env", ListOf(STRING), True), Field("L", MapOf(STRING), True))
)
OUTER = Struct(
    "Outer",
    (
        Field("name", STRING),
        Field("n", INT),
        Field("flag", BOOL),
        Field("when", TIME, True),
        Field("inner", INNER),
        Field("ptr", PtrTo(INNER), True),
    ),
)


def test_unmarshal_matches_fields_case_insensitively_and_drops_unknown_ones():
    v = gojson.unmarshal(b'{"NAME":"a","N":3,"Flag":true,"extra":[1,{"x":null}],"inner":{"user":"u"}}', OUTER)
    assert v["name"] == "a" and v["n"] == 3 and v["flag"] is True and v["inner"]["User"] == "u"


def test_unmarshal_prefers_the_exact_key_but_processes_keys_in_order():
    v = gojson.unmarshal(b'{"name":"exact","NAME":"folded"}', OUTER)
    assert v["name"] == "folded"  # both keys name the same field; the later one wins


def test_duplicate_objects_merge_structs_and_maps_but_replace_slices():
    data = b'{"inner":{"User":"a","Env":["x"],"L":{"k":"1"}},"Inner":{"Env":["y"],"L":{"j":"2"}}}'
    inner = gojson.unmarshal(data, OUTER)["inner"]
    assert inner == {"User": "a", "Env": ["y"], "L": {"k": "1", "j": "2"}}


def test_null_leaves_values_but_clears_pointers_slices_and_maps():
    v = gojson.unmarshal(b'{"name":"a","name":null,"inner":null,"ptr":null,"when":null}', OUTER)
    assert v["name"] == "a" and v["ptr"] is None and v["when"] is None
    assert gojson.unmarshal(b"null", OUTER) == OUTER.zero()


@pytest.mark.parametrize(
    "data",
    [
        b'{"n":1.0}',
        b'{"n":1e3}',
        b'{"n":9223372036854775808}',
        b'{"name":1}',
        b'{"flag":"true"}',
        b'{"inner":[]}',
        b'{"when":5}',
        b'{"when":"yesterday"}',
        b"[]",
        b'{"inner":{"Env":"x"}}',
        b"{",
        b"",
        b'{"n":NaN}',
        b"{} x",
    ],
)
def test_type_mismatches_and_syntax_errors_are_rejected(data):
    with pytest.raises(GoJSONError):
        gojson.unmarshal(data, OUTER)


def test_invalid_utf8_is_replaced_byte_by_byte_and_lone_surrogates_too():
    v = gojson.unmarshal(b'{"name":"a\xe2\x82b\\ud800"}', OUTER)
    assert v["name"] == "a\ufffd\ufffdb\ufffd"


def test_encode_value_applies_omitempty_and_sorts_maps():
    v = gojson.unmarshal(b'{"inner":{"L":{"b":"1","a":"2"}},"when":"2024-01-02T03:04:05.500Z"}', OUTER)
    out = marshal(gojson.encode_value(v, OUTER))
    assert out == b'{"name":"","n":0,"flag":false,"when":"2024-01-02T03:04:05.5Z","inner":{"L":{"a":"2","b":"1"}}}'


def test_go_quote():
    assert go_quote('a"b\\\n\x01é') == '"a\\"b\\\\\\n\\x01é"'
