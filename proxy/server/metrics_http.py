"""The daemon's metrics for Prometheus: ``GET /metrics`` on ``--metrics-listen HOST:PORT``, and the same text written
atomically to ``--metrics-textfile PATH`` every N seconds, for node_exporter's textfile collector.

Imported only when one of them is on: prometheus_client makes the exposition (text or OpenMetrics, as the scraper's
``Accept`` asks), from a collector that reads :data:`proxy.server.metrics.STATS` at scrape time, in the trio thread
(nothing is recorded through prometheus_client's locked metric objects, so serving clients costs no more with metrics
on). The process collector adds ``process_*`` (CPU, memory, open fds).

```
daemon background nursery
├── metrics listener     accept → one task per scrape (at most MAX_SCRAPES at once; more are closed at once)
│   └── scrape           read the request head (deadline), render, send (deadline), close
└── textfile writer      every interval: render, write PATH.tmp in a worker thread, rename over PATH
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.server.metrics import DURATION_BUCKETS, Stats
from proxy.server.status import cache_bytes

if TYPE_CHECKING:
    from proxy.cache.store import BlobStore

log = logging.getLogger("image-proxy.metrics")

#: a scraper has this long to send its request head, and we as long to send the answer
REQUEST_DEADLINE = 10.0
SEND_DEADLINE = 10.0
#: scrapes served at once; more connections are closed at once
MAX_SCRAPES = 8
#: the longest request head read
MAX_HEAD = 8 << 10
#: a textfile write that takes longer than this is left to finish on its own (a hung filesystem); the next one
#: waits for it
TEXTFILE_WRITE_DEADLINE = 30.0


class MetricsError(Exception):
    """The metrics listener cannot be set up (its address cannot be bound)."""


def bind(host: str, port: int) -> socket.socket:
    """The listening TCP socket for ``/metrics`` (bound now, so that a bad address stops the daemon at start)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MetricsError(f"metrics-listen {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise MetricsError(f"metrics-listen {host}:{port}: cannot listen there: {e.strerror}") from None
    return sock


class StatsCollector(Collector):
    """The image_proxy_* metric families, from a :class:`Stats` (read when collected, in the trio thread)."""

    def __init__(self, stats: Stats, store: BlobStore | None) -> None:
        self._stats = stats
        self._store = store
        #: the cache's size at the last refresh (None: no cache, or it cannot be read)
        self.cache_bytes: int | None = None

    def collect(self) -> Iterator[Metric]:
        s = self._stats

        def counter(name: str, doc: str, labels: list[str], values: dict) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return family

        yield counter(
            "image_proxy_requests",
            "Protocol requests answered, by method and outcome (ok, error, refused by a limit).",
            ["method", "outcome"],
            s.requests,
        )
        durations = HistogramMetricFamily(
            "image_proxy_request_duration_seconds",
            "How long requests took to handle, by method (FinishPipe waits for its transfer).",
            labels=["method"],
        )
        bounds = [floatToGoString(b) for b in (*DURATION_BUCKETS, math.inf)]
        for method, counts in sorted(s.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            durations.add_metric([method], buckets, sum_value=s.duration_sums[method])
        yield durations
        yield counter(
            "image_proxy_blob_bytes",
            "Blob bytes sent to clients, by where they came from (network: a registry; cache: a verified "
            "blob-cache file; local: a local image).",
            ["source"],
            s.blob_bytes,
        )
        yield counter(
            "image_proxy_transfers",
            "Blob transfers ended, by outcome (ok, error, gone: the client went away).",
            ["outcome"],
            s.transfers_done,
        )
        yield counter(
            "image_proxy_upstream_bytes",
            "Blob body bytes received from registries, by host.",
            ["host"],
            s.upstream_bytes,
        )
        yield counter(
            "image_proxy_resumes",
            "Blob bodies asked for again after they broke off, by the host that failed and the cause.",
            ["host", "cause"],
            s.resumes,
        )
        yield counter(
            "image_proxy_stalls", "Blob bodies that stalled (no byte within the stall deadline).", ["host"], s.stalls
        )
        yield counter(
            "image_proxy_mirror_fallbacks",
            "Requests a mirror failed, the next pull source then asked, by mirror host.",
            ["host"],
            s.mirror_fallbacks,
        )
        yield counter(
            "image_proxy_limit_refusals",
            "Requests and connections refused by a limit, by the limit's configuration name.",
            ["limit"],
            s.limit_refusals,
        )
        yield CounterMetricFamily(
            "image_proxy_cache_hits", "Blob lookups served from the blob cache.", value=s.cache_hits
        )
        yield CounterMetricFamily(
            "image_proxy_cache_misses",
            "Blob lookups the blob cache did not hold (downloaded into it, or streamed uncached).",
            value=s.cache_misses,
        )
        yield GaugeMetricFamily("image_proxy_active_transfers", "Blob transfers in flight.", value=len(s.transfers))
        yield GaugeMetricFamily("image_proxy_connections", "Client connections open.", value=len(s.clients))
        if self._store is not None and self.cache_bytes is not None:
            yield GaugeMetricFamily(
                "image_proxy_cache_bytes",
                "Bytes in the blob cache (blobs and partial downloads).",
                value=self.cache_bytes,
            )
        yield GaugeMetricFamily("image_proxy_uptime_seconds", "Seconds since the daemon started.", value=s.uptime)


class MetricsExporter:
    """What ``--metrics-listen`` and ``--metrics-textfile`` ask for; :meth:`run` serves them until cancelled."""

    def __init__(
        self,
        stats: Stats,
        store: BlobStore | None,
        listener: socket.socket | None = None,
        textfile: str | None = None,
        interval: float = 15.0,
    ) -> None:
        self.collector = StatsCollector(stats, store)
        #: what /metrics serves: ours and the process's (CPU, memory, fds)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        #: what the textfile holds: ours only (node_exporter has process_* metrics of its own, which would clash)
        self._file_registry = CollectorRegistry(auto_describe=False)
        self._file_registry.register(self.collector)
        self._store = store
        self._listener = listener
        self._textfile = Path(textfile) if textfile else None
        self._interval = interval
        self._scrapes = 0
        self._writing = False

    @property
    def address(self) -> str | None:
        if self._listener is None:
            return None
        host, port = self._listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (its bytes and content type) for a scraper that accepts ``accept``."""
        self.collector.cache_bytes = await cache_bytes(self._store)
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self._listener is not None:
                log.info("metrics: serving http://%s/metrics", self.address)
                nursery.start_soon(self._serve, trio.socket.from_stdlib_socket(self._listener))
            if self._textfile is not None:
                log.info("metrics: writing %s every %g s", self._textfile, self._interval)
                nursery.start_soon(self._write_textfile_every_interval)

    # ------------------------------------------------------------------ /metrics

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        listener = trio.SocketListener(sock)
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:
                    log.warning("metrics: cannot accept a connection: %s", e.strerror or e)
                    await trio.sleep(0.1)  # out of fds, say: do not spin
                    continue
                if self._scrapes >= MAX_SCRAPES:
                    await stream.aclose()
                    continue
                self._scrapes += 1
                nursery.start_soon(self._scrape, stream)

    async def _scrape(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                request = await self._read_request(stream)
                if request is None:
                    return
                conn, method, target, accept = request
                status, content_type, body = await self._answer(method, target, accept)
                headers = [
                    ("Content-Type", content_type),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
                data = conn.send(h11.Response(status_code=status, headers=headers))
                if method != "HEAD":
                    data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                with trio.move_on_after(SEND_DEADLINE):
                    await stream.send_all(data)
        except (OSError, trio.BrokenResourceError, h11.LocalProtocolError):
            pass
        finally:
            self._scrapes -= 1

    async def _read_request(self, stream: trio.SocketStream) -> tuple[h11.Connection, str, str, str] | None:
        """The request (its method, path and Accept header) read within :data:`REQUEST_DEADLINE`, or None (a
        scraper that sends nothing, or no HTTP: the connection is closed)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        with trio.move_on_after(REQUEST_DEADLINE):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return None
                if isinstance(event, h11.Request):
                    accept = ", ".join(v.decode("latin-1") for k, v in event.headers if k == b"accept")
                    target = event.target.decode("latin-1").split("?", 1)[0]
                    return conn, event.method.decode("ascii", "replace"), target, accept
                if event is not h11.NEED_DATA:
                    return None
                conn.receive_data(await stream.receive_some(4096))
        return None

    async def _answer(self, method: str, target: str, accept: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET /metrics here\n"
        if target == "/metrics":
            body, content_type = await self.render(accept)
            return 200, content_type, body
        if target == "/":
            return 200, text, b"image-proxy daemon: metrics at /metrics\n"
        return 404, text, b"not found: metrics are at /metrics\n"

    # ------------------------------------------------------------------ the textfile

    async def _write_textfile_every_interval(self) -> None:
        assert self._textfile is not None
        failing: str | None = None
        while True:
            if not self._writing:  # a write left to finish on its own is not joined by another
                self.collector.cache_bytes = await cache_bytes(self._store)
                data = generate_latest(self._file_registry)  # the text format node_exporter reads
                try:
                    with trio.move_on_after(TEXTFILE_WRITE_DEADLINE):
                        self._writing = True
                        await trio.to_thread.run_sync(self._write, data, abandon_on_cancel=True)
                        if failing is not None:
                            log.info("metrics: %s written again", self._textfile)
                        failing = None
                except OSError as e:
                    if failing != str(e):  # once per distinct error, not every interval
                        log.warning("metrics: cannot write %s: %s", self._textfile, e.strerror or e)
                    failing = str(e)
            await trio.sleep(self._interval)  # the writer's period, not a synchronisation

    def _write(self, data: bytes) -> None:
        """``data`` into the textfile atomically: a temporary file beside it, renamed over it (node_exporter never
        reads half a file). In a worker thread."""
        assert self._textfile is not None
        try:
            temporary = self._textfile.with_name(f".{self._textfile.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.replace(temporary, self._textfile)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        finally:
            self._writing = False


__all__ = ["MetricsError", "MetricsExporter", "StatsCollector", "bind"]
