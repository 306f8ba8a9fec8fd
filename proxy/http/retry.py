"""When to try a request again, and how long to wait: full-jitter exponential backoff per host that
honours ``Retry-After`` (seconds or an HTTP date, capped), and counts toward an overall deadline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import attrs

#: statuses worth another try: the server or something in front of it is overloaded or restarting
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@attrs.frozen
class RetryPolicy:
    """``attempts`` tries in all; waits drawn from [0, min(cap, base * 2**n)] (full jitter)."""

    attempts: int = 4
    base: float = 0.5
    cap: float = 10.0
    #: a server's Retry-After is honoured up to this many seconds
    retry_after_cap: float = 30.0
    #: no wait may end later than this many seconds after the first try
    deadline: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
        """The wait before try number ``attempt + 1`` (``attempt`` counts from 0)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return rng() * min(self.cap, self.base * (2**attempt))


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        import email.utils  # rarely needed (an HTTP-date Retry-After): 2 ms of start-up otherwise

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


#: a single try: for a mirror (passed over at once for the next source) and for https before a plain-HTTP fallback
ONE_TRY = RetryPolicy(attempts=1)
