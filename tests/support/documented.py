"""The numbers the documentation promises, read from the documentation itself.

A test of a promised number asserts the number the reader is told (README.md, docs/PROTOCOL.md), not the code's
constant: a change of the constant then fails the test until the documentation says the same, and a change of the
sentence fails it too (the sentence is not found), so code and documentation cannot drift apart silently.

Each lookup is a regular expression matched against the document with its line breaks and runs of spaces folded
into one space (a wrapped sentence still matches); its groups are the promised numbers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = "README.md"
PROTOCOL = "docs/PROTOCOL.md"

#: number words the documentation spells out
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


@functools.cache
def text(document: str) -> str:
    """``document`` (a path under the repository) with all whitespace runs folded into one space."""
    return " ".join((ROOT / document).read_text(encoding="utf-8").split())


def promise(document: str, pattern: str) -> tuple[str, ...]:
    """The groups of ``pattern`` in ``document``; fails, naming both, when the sentence is not there (any more)."""
    match = re.search(pattern, text(document))
    if match is None:
        raise AssertionError(f"{document} no longer says /{pattern}/: update the test with the documentation")
    return match.groups()


def number(document: str, pattern: str) -> int:
    """The one number (digits or a word up to ten) that ``pattern``'s single group matches."""
    (found,) = promise(document, pattern)
    return WORDS[found] if found in WORDS else int(found)


def numbers(document: str, pattern: str) -> tuple[int, ...]:
    return tuple(WORDS[g] if g in WORDS else int(g) for g in promise(document, pattern))
