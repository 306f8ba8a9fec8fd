"""The multipart/byteranges parser (sans-I/O): parts by Content-Range, any chunking, lenient framing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.partial.multipart import (
    BodyEnd,
    MultipartError,
    MultipartParser,
    PartData,
    PartStart,
    boundary_of,
    is_multipart_byteranges,
)

BLOB = bytes((i * 7 + 3) % 256 for i in range(4096))


def build_body(parts: list[tuple[int, int]], boundary: str, newline: bytes = b"\r\n", preamble: bytes = b"") -> bytes:
    out = bytearray(preamble)
    for start, end in parts:
        out += b"--" + boundary.encode() + newline
        out += b"Content-Type: application/octet-stream" + newline
        out += f"Content-Range: bytes {start}-{end - 1}/{len(BLOB)}".encode() + newline + newline
        out += BLOB[start:end] + newline
    out += b"--" + boundary.encode() + b"--" + newline
    return bytes(out)


def parse(body: bytes, boundary: str, cuts: list[int]) -> list[tuple[int, bytes]]:
    parser = MultipartParser(boundary)
    events = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    for a, b in itertools.pairwise(bounds):
        events += parser.feed(body[a:b])
    parser.end()
    assert isinstance(events[-1], BodyEnd)
    parts: list[tuple[int, bytes]] = []
    for event in events:
        if isinstance(event, PartStart):
            parts.append((event.content_range.start, b""))
        elif isinstance(event, PartData):
            start, data = parts[-1]
            parts[-1] = (start, data + event.data)
    return parts


boundaries = st.one_of(
    st.text("abcdefXYZ0123456789'()+_,-./=?", min_size=1, max_size=40),
    # CloudFront: unquoted, with characters a MIME token may not hold
    st.text("abcdef0123456789:", min_size=1, max_size=40).map(lambda s: "CloudFront:" + s),
)


@settings(max_examples=300, deadline=None)
@given(
    starts=st.lists(st.integers(0, len(BLOB) - 1), min_size=1, max_size=8),
    lengths=st.lists(st.integers(1, 600), min_size=8, max_size=8),
    boundary=boundaries,
    newline=st.sampled_from([b"\r\n", b"\n"]),
    preamble=st.sampled_from([b"", b"some preamble\r\n", b"\r\n"]),
    cuts=st.lists(st.integers(0, 20000), max_size=12),
    order=st.randoms(use_true_random=False),
)
def test_parts_come_out_with_their_own_ranges(starts, lengths, boundary, newline, preamble, cuts, order):
    parts = [(s, min(len(BLOB), s + n)) for s, n in zip(starts, lengths, strict=False)]
    order.shuffle(parts)  # reordered parts
    body = build_body(parts, boundary, newline, preamble)
    got = parse(body, boundary, cuts)
    assert got == [(s, BLOB[s:e]) for s, e in parts]


def test_a_part_holding_the_boundary_is_not_cut_short():
    boundary = "XYZ"
    blob_part = b"\r\n--XYZ\r\nfake"
    body = (
        b"--XYZ\r\nContent-Range: bytes 0-12/13\r\n\r\n" + blob_part + b"\r\n--XYZ--\r\n"
    )  # the part's bytes contain a delimiter
    parser = MultipartParser(boundary)
    events = parser.feed(body)
    parser.end()
    assert b"".join(e.data for e in events if isinstance(e, PartData)) == blob_part


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/byteranges; boundary=00000000000000000001", "00000000000000000001"),
        ('multipart/byteranges; boundary="a b:c"', "a b:c"),
        ('multipart/byteranges; charset=x; BOUNDARY="q\\"x"', 'q"x'),
        # CloudFront's invalid unquoted boundary (containers/image works around it with a regex)
        ("multipart/byteranges; boundary=CloudFront:2C8E3B3B8A6F4A1E9E0D", "CloudFront:2C8E3B3B8A6F4A1E9E0D"),
        ("multipart/byteranges", None),
        ('multipart/byteranges; boundary="unterminated', None),
    ],
)
def test_boundary_parameter(content_type, boundary):
    assert is_multipart_byteranges(content_type)
    assert boundary_of(content_type) == boundary


def test_not_multipart():
    assert not is_multipart_byteranges("application/octet-stream")
    assert not is_multipart_byteranges(None)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"--B\r\nContent-Type: x\r\n\r\nabc\r\n--B--\r\n", "no Content-Range"),
        (b"--B\r\nContent-Range: bytes 5-2/10\r\n\r\nabc\r\n--B--\r\n", "unusable Content-Range"),
        (b"--B\r\nContent-Range: bytes 0-1/10\r\n\r\nabc\r\n--B--\r\n", "longer than its Content-Range"),
        (b"--B\r\nContent-Range: bytes 0-2/10\r\n\r\nab", "ended early"),
        (b"x" * 70000, "no multipart delimiter"),
    ],
)
def test_malformed_bodies_are_errors(body, error):
    parser = MultipartParser("B")
    with pytest.raises(MultipartError, match=error):
        parser.feed(body)
        parser.end()
