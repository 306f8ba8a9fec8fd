"""GetBlobAt's ranges argument and its documented bounds: the numbers are docs/PROTOCOL.md's ("1 to **1024**
ranges per call; each length 1 to **1 GiB** (2^30); `offset + length` at most 2^53-1"), read from it
(tests/support/documented.py), not the code's constants, and each is tested on both sides of the boundary."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolViolation
from protocol.messages import Request
from protocol.methods import parse_args
from tests.support.documented import PROTOCOL, numbers

DIGEST = "sha256:" + "a" * 64
#: docs/PROTOCOL.md, GetBlobAt's bounds
MAX_RANGES_PER_CALL, LENGTH_EXPONENT, END_EXPONENT = numbers(
    PROTOCOL,
    r"1 to \*\*(\d+)\*\* ranges per call; each length 1 to \*\*1 GiB\*\* \(2\^(\d+)\); "
    r"`offset \+ length` at most 2\^(\d+)-1",
)
MAX_RANGE_LENGTH = 1 << LENGTH_EXPONENT
MAX_END = (1 << END_EXPONENT) - 1


def test_the_documented_bounds_are_these():
    assert (MAX_RANGES_PER_CALL, MAX_RANGE_LENGTH, MAX_END) == (1024, 1 << 30, 2**53 - 1)


@pytest.mark.parametrize(
    "ranges",
    [
        pytest.param([[0, 1]] * MAX_RANGES_PER_CALL, id="as-many-ranges-as-allowed"),
        pytest.param([[0, MAX_RANGE_LENGTH]], id="the-longest-range"),
        pytest.param([[MAX_END - 5, 5]], id="ending-at-the-last-offset"),
        pytest.param([[0, 1]], id="one-byte"),
    ],
)
def test_ranges_at_the_bounds_are_accepted(ranges):
    _, args = parse_args(Request("GetBlobAt", [1, DIGEST, ranges]))
    assert args[2] == [tuple(r) for r in ranges]


def test_ranges_are_parsed():
    spec, args = parse_args(Request("GetBlobAt", [1, DIGEST, [[0, 10], [100, 1]]]))
    assert spec.fd_count == 1 and args == [1, DIGEST, [(0, 10), (100, 1)]]
    assert parse_args(Request("GetLayerTOC", [1, DIGEST]))[1] == [1, DIGEST]
    assert parse_args(Request("GetLayerTarSplit", [1, DIGEST]))[1] == [1, DIGEST]


@pytest.mark.parametrize(
    ("ranges", "error"),
    [
        ("0-10", "expecting an array"),
        ([], "at least one"),
        ([[0, 1]] * (MAX_RANGES_PER_CALL + 1), f"at most {MAX_RANGES_PER_CALL}"),
        ([[0]], r"range 0: expecting \[offset, length\]"),
        ([[0, 1], [5, 0]], r"range 1: length 0 is not within"),
        ([[0, MAX_RANGE_LENGTH + 1]], "not within"),
        ([[-1, 5]], "non-negative"),
        ([[MAX_END - 4, 5]], "ends beyond"),
        ([["0", 5]], "expecting numeric"),
    ],
)
def test_bad_ranges(ranges, error):
    with pytest.raises(ProtocolViolation, match=error):
        parse_args(Request("GetBlobAt", [1, DIGEST, ranges]))
