"""Per-connection limits, so one client cannot starve the others of a shared daemon.

Sans-I/O: the request-rate bucket is given the time, it does not read a clock.
"""

from __future__ import annotations

import attrs

from protocol.codec import MAX_MSG_SIZE


@attrs.frozen
class SessionLimits:
    """What one connection may hold or do. ``None``: no limit."""

    #: images open at once (OpenImage without CloseImage)
    open_images: int | None = 256
    #: pipes handed out and not yet finished (GetBlob, GetManifest, ... without FinishPipe)
    open_pipes: int | None = 256
    #: sustained requests per second, with bursts of ``request_burst``
    requests_per_second: float | None = None
    request_burst: int = 1000
    #: the largest request packet accepted (at most the protocol's 32 KiB)
    max_request_size: int = MAX_MSG_SIZE
    #: requests with an id (request-ids extension) handled at the same time; more wait for a slot
    concurrent_requests: int = 32


#: what a shared daemon applies unless its configuration says otherwise
DAEMON_LIMITS = SessionLimits(open_images=64, open_pipes=64, requests_per_second=500.0, request_burst=1000)


class RequestRate:
    """A token bucket: ``allow(now)`` says whether one more request fits the rate."""

    def __init__(self, per_second: float | None, burst: int) -> None:
        self.per_second = per_second
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        if self.per_second is None:
            return True
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
