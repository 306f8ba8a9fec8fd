"""Fuzz target: multipart/byteranges bodies and their headers (proxy.partial.multipart, and the Content-Range
parser it uses, proxy.http.ranges).

Input (text-friendly, so that seeds are readable): ``CONTENT-TYPE \\n CHUNKING \\n BODY``. The first line is
a Content-Type header value (latin-1, as proxy.http.headers decodes them), also read as a Content-Range; each
byte of the second line is the size of one ``feed`` (1 to 16 bytes, cycling); the rest is the body.

Invariants:

* ``is_multipart_byteranges``, ``boundary_of`` and ``parse_content_range`` never raise; a boundary is 1 to
  200 characters without CR or LF; a Content-Range has ``start <= end`` and ``end < total``;
* the parser raises nothing but ``MultipartError``; its events are well formed: each ``PartStart`` is
  followed by exactly its Content-Range's length of ``PartData``, then ``PartEnd``, and ``BodyEnd`` comes last
  and only after ``end()`` succeeds;
* the same body fed whole or in pieces succeeds or fails alike, and when it succeeds gives the same parts.

Run: ``python -m tests.fuzz.fuzz_multipart [libFuzzer flags] tests/fuzz/corpus/fuzz_multipart``.
"""

from __future__ import annotations

import atheris

from tests.fuzz import _common

with atheris.instrument_imports(include=["proxy.partial.multipart", "proxy.http.ranges"]):
    from proxy.http.ranges import parse_content_range
    from proxy.partial import multipart
    from proxy.partial.multipart import BodyEnd, MultipartError, MultipartParser, PartData, PartEnd, PartStart

DEFAULT_BOUNDARY = "THIS_STRING_SEPARATES"


def parse(boundary: str, body: bytes, sizes: list[int]) -> tuple[list[tuple], str | None]:
    """Feed ``body`` in pieces of ``sizes`` (cycling; one piece if empty) and end it. Returns the parts as
    (start, end, total, data) and ``"body-end"``, then the error text or None; checks the event grammar."""
    parser = MultipartParser(boundary)
    parts: list[tuple] = []
    current: tuple | None = None
    data: list[bytes] = []
    ended = False

    def take(events: list[multipart.Event]) -> None:
        nonlocal current, ended
        for event in events:
            assert not ended, f"{event} after BodyEnd"
            if isinstance(event, PartStart):
                assert current is None, "PartStart inside a part"
                cr = event.content_range
                current = (cr.start, cr.end, cr.total)
                data.clear()
            elif isinstance(event, PartData):
                assert current is not None and event.data, "PartData outside a part, or empty"
                data.append(event.data)
            elif isinstance(event, PartEnd):
                assert current is not None, "PartEnd outside a part"
                joined = b"".join(data)
                assert len(joined) == current[1] - current[0] + 1, (current, len(joined))
                parts.append((*current, joined))
                current = None
            else:
                assert isinstance(event, BodyEnd), event
                assert current is None, "BodyEnd inside a part"
                assert parser.done
                ended = True
                parts.append(("body-end",))

    try:
        if sizes:
            offset, i = 0, 0
            while offset < len(body):
                n = sizes[i % len(sizes)]
                take(parser.feed(body[offset : offset + n]))
                offset += n
                i += 1
        else:
            take(parser.feed(body))
        take(parser.feed(b""))
        parser.end()
    except MultipartError as e:
        return parts, str(e) or "error"
    assert ended, "end() accepted a body without its final delimiter"
    return parts, None


def test_one_input(data: bytes) -> None:
    header, _, rest = data.partition(b"\n")
    chunking, _, body = rest.partition(b"\n")
    content_type = header.decode("latin-1")

    multipart.is_multipart_byteranges(content_type)
    boundary = multipart.boundary_of(content_type)
    if boundary is not None:
        assert 1 <= len(boundary) <= multipart.MAX_BOUNDARY and "\r" not in boundary and "\n" not in boundary
    got = parse_content_range(content_type)
    if got is not None:
        assert 0 <= got.start <= got.end and (got.total is None or got.end < got.total), got
        assert got.length >= 1

    boundary = boundary or DEFAULT_BOUNDARY
    whole_parts, whole_error = parse(boundary, body, [])
    sizes = [b % 16 + 1 for b in chunking] or [1]
    piece_parts, piece_error = parse(boundary, body, sizes)
    # Bodies this small (libFuzzer's inputs are a few KiB) stay below the 64 KiB preamble and header caps, where
    # feeding in pieces could legitimately fail earlier than feeding at once.
    assert (piece_error is None) == (whole_error is None), (whole_error, piece_error)
    if whole_error is None:
        assert piece_parts == whole_parts, (whole_parts, piece_parts)


def main() -> None:
    _common.run("fuzz_multipart", test_one_input)


if __name__ == "__main__":
    main()
