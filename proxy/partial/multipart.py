"""A ``multipart/byteranges`` body parser (RFC 9110 §14.6), sans-I/O: bytes in, events out.

Parts are told apart by **their own Content-Range**, never by position: a server may send parts in another
order than asked, or coalesce neighbouring ranges into one part (RFC 9110 allows both). A part's body length
comes from its Content-Range, and the delimiter that must follow it is checked, so binary data that happens
to contain the boundary cannot cut a part short.

Lenient where real servers are sloppy: LF-only line ends, a preamble before the first delimiter, transport
padding after a delimiter, and the boundary parameter of ``Content-Type``: CloudFront sends it unquoted with
characters a token may not contain (``:``), which a strict MIME parser rejects (containers/image needs a regex
for it). Bounded: a preamble and a part's header block are each at most 64 KiB.
"""

from __future__ import annotations

import re

import attrs

from proxy.http.ranges import ContentRange, parse_content_range

MAX_PREAMBLE = 64 << 10
MAX_PART_HEAD = 64 << 10
MAX_BOUNDARY = 200


class MultipartError(ValueError):
    """The body is not a well-formed multipart/byteranges body."""


@attrs.frozen
class PartStart:
    content_range: ContentRange


@attrs.frozen
class PartData:
    data: bytes


@attrs.frozen
class PartEnd:
    pass


@attrs.frozen
class BodyEnd:
    pass


Event = PartStart | PartData | PartEnd | BodyEnd

_PARAM = re.compile(r";\s*boundary\s*=\s*", re.IGNORECASE)


def is_multipart_byteranges(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "multipart/byteranges"


def boundary_of(content_type: str | None) -> str | None:
    """The boundary parameter: quoted (with backslash escapes) or not, whatever characters it holds."""
    if not content_type:
        return None
    m = _PARAM.search(content_type)
    if m is None:
        return None
    rest = content_type[m.end() :]
    if rest.startswith('"'):
        out = []
        i = 1
        while i < len(rest):
            c = rest[i]
            if c == "\\" and i + 1 < len(rest):
                out.append(rest[i + 1])
                i += 2
                continue
            if c == '"':
                break
            out.append(c)
            i += 1
        else:
            return None  # unterminated quote
        value = "".join(out)
    else:
        value = rest.split(";", 1)[0].strip()
    if not value or len(value) > MAX_BOUNDARY or any(c in value for c in "\r\n"):
        return None
    return value


class _State:
    PREAMBLE = "preamble"
    AFTER_DELIMITER = "after-delimiter"
    HEADERS = "headers"
    BODY = "body"
    DELIMITER = "delimiter"
    DONE = "done"


class MultipartParser:
    """Feed body bytes with :meth:`feed`; it returns the events they complete. :meth:`end` says the body is
    over (raises MultipartError if that is too early)."""

    def __init__(self, boundary: str) -> None:
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._buffer = bytearray()
        self._state = _State.PREAMBLE
        self._remaining = 0
        self._at_start = True  # the preamble search is at the very start of the body

    @property
    def done(self) -> bool:
        return self._state == _State.DONE

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _State.DONE:
            return []  # the epilogue is ignored
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def end(self) -> None:
        if self._state != _State.DONE:
            raise MultipartError(f"the multipart body ended early (while reading the {self._state})")

    # -- states --------------------------------------------------------------------------------------

    def _step(self, events: list[Event]) -> bool:
        state = self._state
        if state == _State.PREAMBLE:
            return self._preamble()
        if state == _State.AFTER_DELIMITER:
            return self._after_delimiter(events)
        if state == _State.HEADERS:
            return self._headers(events)
        if state == _State.BODY:
            return self._body(events)
        if state == _State.DELIMITER:
            return self._delimiter()
        return False

    def _preamble(self) -> bool:
        buf = self._buffer
        if self._at_start and buf.startswith(self._dash_boundary):
            del buf[: len(self._dash_boundary)]
            self._state = _State.AFTER_DELIMITER
            return True
        if self._at_start and len(buf) < len(self._dash_boundary) and self._dash_boundary.startswith(bytes(buf)):
            return False
        i = buf.find(b"\n" + self._dash_boundary)
        if i >= 0:
            del buf[: i + 1 + len(self._dash_boundary)]
            self._state = _State.AFTER_DELIMITER
            return True
        if len(buf) > MAX_PREAMBLE:
            raise MultipartError(f"no multipart delimiter in the first {MAX_PREAMBLE} bytes")
        self._at_start = False
        keep = len(self._dash_boundary)  # a delimiter may straddle two feeds
        if len(buf) > keep + 1:
            del buf[: len(buf) - keep - 1]
        return False

    def _after_delimiter(self, events: list[Event]) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        if buf.startswith(b"--"):
            self._state = _State.DONE
            events.append(BodyEnd())
            buf.clear()
            return False
        i = buf.find(b"\n")
        if i < 0:
            if len(buf) > MAX_PART_HEAD:
                raise MultipartError("garbage after a multipart delimiter")
            return False
        if buf[:i].strip(b" \t\r"):
            raise MultipartError(f"unexpected bytes after a multipart delimiter: {bytes(buf[:i][:40])!r}")
        del buf[: i + 1]
        self._state = _State.HEADERS
        return True

    def _headers(self, events: list[Event]) -> bool:
        buf = self._buffer
        end = None
        if buf.startswith(b"\r\n") or buf.startswith(b"\n"):
            # A part with no header at all: its body starts here. Checked first, so that a blank line further
            # on cannot make the body's first lines headers (only when more of the body had arrived).
            end, head = (2 if buf.startswith(b"\r\n") else 1), b""
        elif (m := re.search(rb"\r?\n\r?\n", buf)) is not None:
            end, head = m.end(), bytes(buf[: m.start()])
        if end is None:
            if len(buf) > MAX_PART_HEAD:
                raise MultipartError(f"a part's header block is longer than {MAX_PART_HEAD} bytes")
            return False
        del buf[:end]
        content_range = None
        for line in re.split(rb"\r?\n", head):
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"content-range":
                text = value.decode("latin-1").strip()
                content_range = parse_content_range(text)
                if content_range is None:
                    raise MultipartError(f"a part has an unusable Content-Range {text!r}")
        if content_range is None:
            raise MultipartError("a part has no Content-Range")
        events.append(PartStart(content_range))
        self._remaining = content_range.length
        self._state = _State.BODY
        return True

    def _body(self, events: list[Event]) -> bool:
        buf = self._buffer
        if self._remaining and buf:
            n = min(self._remaining, len(buf))
            events.append(PartData(bytes(buf[:n])))
            del buf[:n]
            self._remaining -= n
        if self._remaining:
            return False
        events.append(PartEnd())
        self._state = _State.DELIMITER
        return True

    def _delimiter(self) -> bool:
        buf = self._buffer
        for lead in (b"\r\n", b"\n"):
            wanted = lead + self._dash_boundary
            if buf.startswith(wanted):
                del buf[: len(wanted)]
                self._state = _State.AFTER_DELIMITER
                return True
            if wanted.startswith(bytes(buf)):
                return False  # not all of it yet
        raise MultipartError(
            f"a part is longer than its Content-Range says (no delimiter after it: {bytes(buf[:40])!r})"
        )


__all__ = [
    "BodyEnd",
    "Event",
    "MultipartError",
    "MultipartParser",
    "PartData",
    "PartEnd",
    "PartStart",
    "boundary_of",
    "is_multipart_byteranges",
]
