"""The retry policy's arithmetic (proxy/http/retry.py), which README states as "up to 4 tries with full-jitter
backoff that honours Retry-After (capped at 30 s, all within 60 s)": the backoff's bounds, and Retry-After as
delta-seconds or an HTTP date. The tries and the deadline against a registry: tests/integration/
test_registry_promises.py. Found by the mutation run (docs/TESTING.md): none of this had a test."""

from __future__ import annotations

import email.utils

import pytest

from proxy.http.retry import RetryPolicy, parse_retry_after
from tests.support.documented import README, numbers

CAP, _ = numbers(README, r"honours `Retry-After` \(capped at (\d+) s, all within (\d+) s\)")
NOW = 1_700_000_000.0


def test_full_jitter_backoff_doubles_from_half_a_second_up_to_ten() -> None:
    policy = RetryPolicy()
    longest = [policy.delay(attempt, rng=lambda: 1.0) for attempt in range(7)]
    assert longest == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [policy.delay(attempt, rng=lambda: 0.0) for attempt in range(3)] == [0.0, 0.0, 0.0]
    assert policy.delay(2, rng=lambda: 0.25) == 0.5  # a uniform draw from [0, that bound]


def test_retry_after_replaces_the_backoff_and_is_capped() -> None:
    policy = RetryPolicy()
    assert policy.delay(0, retry_after=7.0, rng=lambda: 1.0) == 7.0
    assert policy.delay(0, retry_after=3600.0) == CAP == 30
    assert policy.delay(0, retry_after=-5.0) == 0.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),  # an HTTP date 90 s from now
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # a date already past: no wait
        (None, None),
        ("", None),
        ("soon", None),
        ("-3", None),
        ("1.5", None),
    ],
)
def test_retry_after_is_delta_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=lambda: NOW) == seconds
