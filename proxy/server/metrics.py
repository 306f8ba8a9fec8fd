"""What the process did and is doing: the counters behind ``/metrics``, and the clients and transfers in flight that
``image-proxy status`` shows and the per-transfer log lines describe.

Recording is plain integer arithmetic in the trio thread (no lock, no I/O, no prometheus_client: a spawned proxy
records too, and never imports it): a request costs two clock reads and a few dict increments, a blob chunk one
addition. The exposition (``proxy.server.metrics_http``) copies these numbers in the trio thread when scraped.

Labels are bounded: a method is one of the protocol's (else ``invalid``), a host one of the first
:data:`MAX_HOSTS` seen (later ones are counted as ``other``: a client of a shared daemon can name any registry),
a cause or a limit one of a fixed few. Image names and digests are never labels.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable

import attrs

#: the request duration histogram's bucket bounds, in seconds: a GetManifest answered at once takes tens of
#: microseconds, an OpenImage a registry round trip or two, a FinishPipe waits for its whole blob
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: distinct upstream hosts given a label of their own; the rest share ``other``
MAX_HOSTS = 64
OTHER_HOST = "other"
#: what a resume answers (the ``cause`` label of image_proxy_resumes_total)
RESUME_CAUSES = ("stall", "reset", "timeout", "tls", "protocol", "refused", "other")
#: where the bytes a client got came from (the ``source`` label of image_proxy_blob_bytes_total): a download
#: from a registry (``network``), a verified blob-cache file (``cache``), a local image (oci:, dir:, archives)
BLOB_SOURCES = ("network", "cache", "local")
#: how the requests of a connection ended (the ``outcome`` label of image_proxy_requests_total)
OUTCOMES = ("ok", "error", "refused")
#: a transfer that received no byte from its upstream (or sent none to its client) for this long is shown stalled
STALLED_AFTER = 5.0
#: the resume causes a transfer keeps for its log line and for status (the count goes on)
MAX_CAUSES = 8


def now() -> float:
    return time.monotonic()


@attrs.define(eq=False)
class Fetch:
    """A blob's bytes coming over the network (one upstream transfer, shared by the clients following it): the
    hosts that served it in turn, its resumes and why, the bytes received and when the last one came."""

    hosts: list[str]
    received: int = 0
    resumes: int = 0
    causes: list[str] = attrs.field(factory=list)
    last_byte: float = attrs.field(factory=now)
    #: the stats it adds to (upstream bytes, resumes, stalls of its host)
    stats: Stats | None = None

    @property
    def host(self) -> str:
        return self.hosts[-1]

    def got(self, n: int) -> None:
        """``n`` body bytes arrived from :attr:`host`."""
        self.received += n
        self.last_byte = now()
        if self.stats is not None:
            self.stats.upstream_bytes[self.stats.host_label(self.hosts[-1])] += n

    def resumed(self, cause: str, text: str) -> None:
        """The body from :attr:`host` broke off (``cause``, one of :data:`RESUME_CAUSES`; ``text`` for people):
        the blob is asked for again."""
        self.resumes += 1
        if len(self.causes) < MAX_CAUSES:
            self.causes.append(text)
        if self.stats is not None:
            self.stats.resumes[(self.stats.host_label(self.hosts[-1]), cause)] += 1
            if cause == "stall":
                self.stats.stalls[self.stats.host_label(self.hosts[-1])] += 1

    def switched(self, host: str) -> None:
        """The rest of the blob comes from ``host`` (a resume got an answer from it)."""
        if host != self.hosts[-1]:
            self.hosts.append(host)

    def idle(self, at: float) -> float:
        return at - self.last_byte


@attrs.define(eq=False)
class Client:
    """A connected client: who (SO_PEERCRED, and its systemd unit when it has one) and since when. ``held`` tells
    the images and pipes it holds, ``requests`` counts its requests."""

    pid: int
    uid: int
    gid: int
    unit: str | None = None
    since: float = attrs.field(factory=now)
    requests: int = 0
    held: Callable[[], tuple[int, int]] | None = None

    def __str__(self) -> str:
        who = f"pid {self.pid} uid {self.uid}"
        return f"{who} ({self.unit})" if self.unit else who


@attrs.define(eq=False)
class Transfer:
    """A blob going to a client's pipe: what, for whom, how far (``sent``, bytes into the pipe), since when, and
    where its bytes come from (``origin``, one of :data:`BLOB_SOURCES`; ``fetch`` when from the network)."""

    method: str
    reference: str
    digest: str
    client: Client | None
    total: int  # -1: unknown
    started: float = attrs.field(factory=now)
    sent: int = 0
    last_sent: float = attrs.field(factory=now)
    origin: str = "local"
    #: the blob being sent (its ``fetch``, when it comes from the network, is looked up live)
    blob: object = None

    def moved(self, n: int) -> None:
        """``n`` more bytes went into the client's pipe."""
        self.sent += n
        self.last_sent = now()

    @property
    def fetch(self) -> Fetch | None:
        return getattr(self.blob, "fetch", None)


class Stats:
    """The process's counters and what is in flight. One per process (:data:`STATS`)."""

    def __init__(self) -> None:
        self.started_wall = time.time()
        self.started = now()
        #: (method, outcome) -> requests
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        #: method -> [count per bucket of DURATION_BUCKETS, then +Inf], and the sum of durations
        self.durations: dict[str, list[int]] = {}
        self.duration_sums: collections.Counter[str] = collections.Counter()
        self.blob_bytes: collections.Counter[str] = collections.Counter({source: 0 for source in BLOB_SOURCES})
        self.upstream_bytes: collections.Counter[str] = collections.Counter()
        self.resumes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stalls: collections.Counter[str] = collections.Counter()
        self.mirror_fallbacks: collections.Counter[str] = collections.Counter()
        self.cache_hits = 0
        self.cache_misses = 0
        #: blobs stored in or evicted from the blob cache (its size is scanned again when this changed)
        self.cache_changes = 0
        self.limit_refusals: collections.Counter[str] = collections.Counter()
        self.transfers_done: collections.Counter[str] = collections.Counter()
        #: what is in flight (insertion-ordered: oldest first)
        self.clients: dict[Client, None] = {}
        self.transfers: dict[Transfer, None] = {}
        self._hosts: set[str] = set()

    # ------------------------------------------------------------------ labels

    def host_label(self, host: str) -> str:
        if host in self._hosts:
            return host
        if len(self._hosts) < MAX_HOSTS:
            self._hosts.add(host)
            return host
        return OTHER_HOST

    # ------------------------------------------------------------------ recording

    def request(self, method: str, outcome: str, seconds: float) -> None:
        """A request was answered (``outcome``: one of :data:`OUTCOMES`) after ``seconds`` of handling."""
        self.requests[(method, outcome)] += 1
        buckets = self.durations.get(method)
        if buckets is None:
            buckets = self.durations[method] = [0] * (len(DURATION_BUCKETS) + 1)
        buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sums[method] += seconds

    def refused(self, limit: str) -> None:
        """A limit refused a request or a connection (``limit``: its configuration name)."""
        self.limit_refusals[limit] += 1

    def mirror_fallback(self, host: str) -> None:
        """``host`` (a mirror) failed a request; the next pull source is tried."""
        self.mirror_fallbacks[self.host_label(host)] += 1

    def cache_lookup(self, hit: bool) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1

    def cache_changed(self) -> None:
        """A blob was stored in the blob cache, or evicted (from the evicting worker thread: an int's ``+=``
        under the GIL, and a lost count would only delay a rescan)."""
        self.cache_changes += 1

    def new_fetch(self, host: str) -> Fetch:
        return Fetch([host], stats=self)

    def connected(self, client: Client) -> None:
        self.clients[client] = None

    def disconnected(self, client: Client) -> None:
        self.clients.pop(client, None)

    def begin(self, transfer: Transfer) -> None:
        self.transfers[transfer] = None

    def end(self, transfer: Transfer, outcome: str) -> None:
        """A transfer ended (``outcome``: ``ok``, ``error`` or ``gone``): its bytes count by where they came from."""
        self.transfers.pop(transfer, None)
        self.blob_bytes[transfer.origin] += transfer.sent
        self.transfers_done[outcome] += 1

    @property
    def uptime(self) -> float:
        return now() - self.started


#: the process's stats: a spawned proxy records into it as a daemon does (nothing reads it there)
STATS = Stats()


__all__ = [
    "BLOB_SOURCES",
    "DURATION_BUCKETS",
    "OUTCOMES",
    "RESUME_CAUSES",
    "STALLED_AFTER",
    "STATS",
    "Client",
    "Fetch",
    "Stats",
    "Transfer",
]
