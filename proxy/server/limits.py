"""Limits, so that no client of a shared daemon can starve the others: per connection (``SessionLimits``) and
daemon-wide, in all and per user (``DaemonLimits``), with the accounting that enforces them.

Sans-I/O: the request-rate bucket is given the time, it does not read a clock; the ledger counts what it is
told. Each refusal is a ``LimitExceeded`` whose text names the limit, its value and what to do.
"""

from __future__ import annotations

import collections
import enum

import attrs

from protocol.codec import MAX_MSG_SIZE
from protocol.errors import ErrorCode, ProxyError
from protocol.server_connection import RequestRate
from proxy.server.metrics import STATS


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
    #: bytes of requests received and not answered yet, and of replies not yet sent (a client that sends and
    #: never reads); beyond it the connection is closed
    queued_bytes: int | None = 16 << 20
    #: worker threads (file reads, hashing) this connection's requests may hold at once
    worker_threads: int = 8


#: what a shared daemon applies unless its configuration says otherwise
DAEMON_LIMITS = SessionLimits(
    open_images=64, open_pipes=64, requests_per_second=500.0, request_burst=1000, queued_bytes=4 << 20, worker_threads=4
)


@attrs.frozen
class DaemonLimits:
    """What all the connections of a daemon, and all those of one user, may hold. ``None``: no limit."""

    connections: int | None = None
    connections_per_uid: int | None = None
    open_images_per_uid: int | None = None
    open_pipes_per_uid: int | None = None
    #: request and reply bytes queued by every connection together
    queued_bytes: int | None = None


#: the daemon's defaults (``[daemon]`` in the config file). With the default RLIMIT_NOFILE raised to its hard
#: limit these fit in fds: a connection costs 1, an open pipe 1 (2 while its reply is sent) plus an upstream
#: connection, so 256 connections with 1024 pipes per user stay far below 524288.
DAEMON_WIDE_LIMITS = DaemonLimits(
    connections=256, connections_per_uid=64, open_images_per_uid=256, open_pipes_per_uid=256, queued_bytes=64 << 20
)


class Resource(enum.Enum):
    IMAGES = "open images"
    PIPES = "open pipes"


class LimitExceeded(ProxyError):
    """A limit refused a request; the text names it."""


class Ledger:
    """Daemon-wide accounting: connections, images and pipes per uid, queued bytes in all."""

    def __init__(self, limits: DaemonLimits | None = None) -> None:
        self.limits = limits or DaemonLimits()
        self.connections = 0
        self.queued_bytes = 0
        self._per_uid: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def held(self, uid: int, what: str) -> int:
        return self._per_uid[uid][what] if uid in self._per_uid else 0

    def connect(self, uid: int) -> str | None:
        """Count a new connection of ``uid``; or the reason it is refused (nothing counted then)."""
        limit = self.limits.connections
        if limit is not None and self.connections >= limit:
            STATS.refused("max-connections")
            return f"the daemon serves {limit} connections, its limit; try again later"
        limit = self.limits.connections_per_uid
        if limit is not None and self.held(uid, "connections") >= limit:
            STATS.refused("max-connections-per-uid")
            return f"uid {uid} has {limit} connections open, the daemon's limit per user; close some"
        self.connections += 1
        self._per_uid[uid]["connections"] += 1
        return None

    def disconnect(self, uid: int) -> None:
        self.connections -= 1
        self._give(uid, "connections", 1)

    def _give(self, uid: int, what: str, n: int) -> None:
        counter = self._per_uid[uid]
        counter[what] -= n
        if counter[what] <= 0:
            del counter[what]
        if not counter:
            del self._per_uid[uid]

    def account(self, uid: int | None, limits: SessionLimits) -> Account:
        return Account(self, uid, limits)


#: the ``limit`` label of image_proxy_limit_refusals_total: the limit's name in the configuration file
_LIMIT_NAMES = {
    (Resource.IMAGES, False): "open-images",
    (Resource.PIPES, False): "open-pipes",
    (Resource.IMAGES, True): "open-images-per-uid",
    (Resource.PIPES, True): "open-pipes-per-uid",
}
_PER_CONNECTION = {Resource.IMAGES: "open_images", Resource.PIPES: "open_pipes"}
_PER_UID = {Resource.IMAGES: "open_images_per_uid", Resource.PIPES: "open_pipes_per_uid"}


def _refusal(what: Resource, limit: int, uid: int | None) -> LimitExceeded:
    STATS.refused(_LIMIT_NAMES[what, uid is not None])
    whose = "this connection's limit" if uid is None else f"the daemon's limit for uid {uid} over all its connections"
    if what is Resource.IMAGES:
        return LimitExceeded(f"{limit} images are open, {whose}; close some with CloseImage")
    return LimitExceeded(
        f"too many open pipes ({limit} is {whose}): finish transfers with FinishPipe (or read GetRawBlob's pipes "
        "to the end) before starting more"
    )


class Account:
    """What one connection holds, checked against its own limits and its user's share of the daemon's."""

    def __init__(self, ledger: Ledger, uid: int | None, limits: SessionLimits) -> None:
        self._ledger = ledger
        self._uid = uid
        self._limits = limits
        self._held: collections.Counter[Resource] = collections.Counter()
        self.queued_bytes = 0

    def holds(self, what: Resource) -> int:
        return self._held[what]

    def take(self, what: Resource, n: int = 1) -> None:
        """Hold ``n`` more of ``what``, or raise LimitExceeded naming the limit."""
        limit = getattr(self._limits, _PER_CONNECTION[what])
        if limit is not None and self._held[what] + n > limit:
            raise _refusal(what, limit, None)
        if self._uid is not None:
            limit = getattr(self._ledger.limits, _PER_UID[what])
            if limit is not None and self._ledger.held(self._uid, what.value) + n > limit:
                raise _refusal(what, limit, self._uid)
            self._ledger._per_uid[self._uid][what.value] += n
        self._held[what] += n

    def give(self, what: Resource, n: int = 1) -> None:
        n = min(n, self._held[what])
        if n <= 0:
            return
        self._held[what] -= n
        if self._uid is not None:
            self._ledger._give(self._uid, what.value, n)

    def queue(self, n: int) -> str | None:
        """Count ``n`` more queued bytes; or why not: ``"connection"`` (this connection's limit: it is closed) or
        ``"daemon"`` (every connection's together: the request is refused). Nothing counted on refusal."""
        limit = self._limits.queued_bytes
        if limit is not None and self.queued_bytes + n > limit:
            return "connection"
        limit = self._ledger.limits.queued_bytes
        if limit is not None and self._ledger.queued_bytes + n > limit:
            return "daemon"
        self.queued_bytes += n
        self._ledger.queued_bytes += n
        return None

    def unqueue(self, n: int) -> None:
        self.queued_bytes -= n
        self._ledger.queued_bytes -= n

    def requeue(self, old: int, new: int) -> None:
        """A request of ``old`` queued bytes became a reply of ``new`` (never refused: sending it is what frees
        the client's share)."""
        delta = new - old
        self.queued_bytes += delta
        self._ledger.queued_bytes += delta

    @property
    def daemon_limits(self) -> DaemonLimits:
        return self._ledger.limits

    def release(self) -> None:
        """Give back everything (the connection ended)."""
        for what in list(self._held):
            self.give(what, self._held[what])
        self.unqueue(self.queued_bytes)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:g} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{n} bytes"


def daemon_busy(limits: DaemonLimits) -> LimitExceeded:
    return LimitExceeded(
        f"the daemon holds {_size(limits.queued_bytes or 0)} of queued requests and replies from all its clients, "
        "its limit; retry shortly",
        ErrorCode.RETRYABLE,
    )


__all__ = [
    "DAEMON_LIMITS",
    "DAEMON_WIDE_LIMITS",
    "Account",
    "DaemonLimits",
    "Ledger",
    "LimitExceeded",
    "RequestRate",
    "Resource",
    "SessionLimits",
    "daemon_busy",
]
