import pytest

from proxy.http.ranges import ContentRange, parse_content_range, range_from


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-99/100", ContentRange(0, 99, 100)),
        ("bytes 100-199/*", ContentRange(100, 199, None)),
        ("BYTES  5-5/6 ", ContentRange(5, 5, 6)),
        ("bytes 10-9/100", None),  # end before start
        ("bytes 0-100/100", None),  # end past the total
        ("bytes */100", None),  # unsatisfied-range form
        ("bytes 1-2", None),
        ("items 0-1/2", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_content_range(value, expected):
    assert parse_content_range(value) == expected


def test_range_from():
    assert range_from(2124175) == "bytes=2124175-"
    assert ContentRange(10, 19, 20).length == 10
