"""Argument validation of every method: counts, types, integers, digests, references."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolViolation
from protocol.messages import Request
from protocol.methods import METHODS, parse_args, parse_digest, parse_uint

SHA256 = "sha256:" + "a" * 64


def violation(method, args):
    with pytest.raises(ProtocolViolation) as info:
        parse_args(Request(method, args))
    return info.value.message


def test_there_are_thirteen_methods_of_0_2_8_and_the_extensions():
    assert len([s for s in METHODS.values() if s.since != "ext"]) == 13
    assert {m for m, s in METHODS.items() if s.since == "ext"} >= {"GetCapabilities"}
    assert {m for m, s in METHODS.items() if s.fd_count == 1 and s.since != "ext"} == {
        "GetManifest",
        "GetConfig",
        "GetFullConfig",
        "GetBlob",
        "GetLayerInfoPiped",
    }
    assert METHODS["GetRawBlob"].fd_count == 2
    assert not METHODS["Shutdown"].replies


def test_unknown_method():
    assert violation("Frobnicate", []) == "unknown method: Frobnicate"


def test_arity_errors_use_the_go_texts():
    assert violation("Initialize", [1]) == "invalid request, expecting zero arguments"
    assert violation("GetBlob", [1, SHA256]) == "found 2 args, expecting (imgid, digest, size)"
    assert violation("FinishPipe", []) == "invalid request, expecting one argument (pipeid), found 0"


def test_integer_rules():
    assert parse_uint(7, "x") == 7
    assert parse_uint(7.0, "x") == 7
    assert parse_uint(2**53 - 1, "x") == 2**53 - 1
    for bad, text in [
        ("7", "expecting numeric, not string"),
        (True, "expecting numeric, not boolean"),
        (None, "expecting numeric, not null"),
        (1.5, "expecting an integer"),
        (-1, "non-negative"),
        (2**53, "out of range"),
        (float("inf"), "expecting an integer"),
    ]:
        with pytest.raises(ProtocolViolation, match=text):
            parse_uint(bad, "x")


def test_digest_rules():
    assert parse_digest(SHA256) == SHA256
    assert parse_digest("sha512:" + "0" * 128)
    for bad, text in [
        ("sha256:" + "a" * 63, "length"),
        ("sha256:" + "A" * 64, "format"),
        ("md5:" + "a" * 32, "unsupported digest algorithm"),
        ("sha256", "format"),
        ("sha256:../../etc/passwd", "format"),
        (5, "expecting string blobid"),
    ]:
        with pytest.raises(ProtocolViolation, match=text):
            parse_digest(bad)


def test_reference_rules():
    assert "expecting string imageref, not number" in violation("OpenImage", [1])
    assert "empty" in violation("OpenImage", [""])


def test_shutdown_ignores_args():
    spec, args = parse_args(Request("Shutdown", [1, 2]))
    assert spec.name == "Shutdown" and args == []


@given(st.sampled_from(sorted(METHODS)), st.lists(st.none() | st.integers() | st.text() | st.floats(), max_size=4))
def test_parse_args_only_raises_protocol_violations(method, args):
    try:
        spec, _parsed = parse_args(Request(method, args))
    except ProtocolViolation:
        return
    assert spec.name == method
