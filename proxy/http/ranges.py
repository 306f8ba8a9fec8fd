"""HTTP byte ranges (RFC 9110 §14): the ``Range`` header we send and the ``Content-Range`` we check."""

from __future__ import annotations

import re

import attrs

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@attrs.frozen
class ContentRange:
    """``bytes START-END/TOTAL`` (END inclusive); ``total`` None for ``*``."""

    start: int
    end: int
    total: int | None

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_content_range(value: str | None) -> ContentRange | None:
    """A satisfied-range Content-Range, or None when absent or malformed (including end < start or past total)."""
    if not value:
        return None
    m = _CONTENT_RANGE.match(value)
    if m is None:
        return None
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        return None
    return ContentRange(start, end, total)


def range_from(offset: int) -> str:
    """``Range`` for everything from ``offset`` on."""
    return f"bytes={offset}-"


def range_between(offset: int, end: int) -> str:
    """``Range`` for bytes ``[offset, end)`` (``end`` exclusive, as Python slices)."""
    if end <= offset:
        raise ValueError(f"empty range [{offset}, {end})")
    return f"bytes={offset}-{end - 1}"
