"""GetBlobAt's ranges argument and its documented bounds."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolViolation
from protocol.messages import Request
from protocol.methods import MAX_RANGE_LENGTH, MAX_RANGES_PER_CALL, parse_args

DIGEST = "sha256:" + "a" * 64


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
        ([[2**53 - 2, 5]], "ends beyond"),
        ([["0", 5]], "expecting numeric"),
    ],
)
def test_bad_ranges(ranges, error):
    with pytest.raises(ProtocolViolation, match=error):
        parse_args(Request("GetBlobAt", [1, DIGEST, ranges]))
