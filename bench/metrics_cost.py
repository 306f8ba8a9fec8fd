#!/usr/bin/env python3
"""What metrics cost the daemon (issue 19): the same daemon without and with ``--metrics-listen``, scraped every
second meanwhile (as by Prometheus) when it is on, alternating, ``--rounds`` times each.

Measured per daemon: sequential GetManifest + FinishPipe round trips on one connection (an image of the registry
opened once; in order, as bench/latency.py's "via daemon" column), and GetBlob throughput of one ``--blob-mb`` MB
layer from a plain-HTTP docker-registry on 127.0.0.1 into a fresh blob cache and the client's pipe (drained and
hashed by the client). Every request is recorded in both (two clock reads and a few dict increments; a chunk one
addition): what metrics-on adds is the collector and the HTTP listener, and the scrapes.

Run from the repository root: ``python bench/metrics_cost.py [--rounds 5] [--round-trips 2700] [--blob-mb 256]``;
a copy of this file in a checkout from before issue 19 measures that daemon with ``--modes off``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from common import (
    REPOSITORY,
    TAG,
    SocketClient,
    build_layers_layout,
    docker_registry,
    free_port,
    image_proxy_daemon,
    push,
)


def read_to_eof(fd: int, hasher: hashlib._Hash | None = None) -> int:
    total = 0
    try:
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    finally:
        os.close(fd)
    return total


class Scraper(threading.Thread):
    """GET /metrics every ``interval`` seconds until stopped (what Prometheus does); counts the scrapes."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval, self.count = url, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            self.count += 1


#: round trips per connection: a daemon's connection may send 1000 requests at once (its request-rate bucket), then
#: 500 per second; each round trip is two requests
PER_CONNECTION = 450


def round_trip_rate(daemon_listen: Path, log: Path, reference: str, round_trips: int, timeout: float) -> float:
    """Sequential GetManifest + FinishPipe round trips, on fresh connections of PER_CONNECTION each (only the
    round trips are timed)."""
    elapsed, done = 0.0, 0
    while done < round_trips:
        client = SocketClient.connect(daemon_listen, timeout, log)
        try:
            client.call("Initialize")
            image = client.call("OpenImage", reference).value
            count = min(PER_CONNECTION, round_trips - done)
            start = time.perf_counter()
            for _ in range(count):
                got = client.call("GetManifest", image)
                client.call("FinishPipe", got.pipeid)
                read_to_eof(got.fds[0])
            elapsed += time.perf_counter() - start
            done += count
        finally:
            client.close()
    return round_trips / elapsed


def blob_throughput(daemon_listen: Path, log: Path, reference: str, digest: str, size: int, timeout: float) -> float:
    """MB/s of one GetBlob from the registry through the daemon's (empty) blob cache, drained and hashed."""
    client = SocketClient.connect(daemon_listen, timeout, log)
    try:
        client.call("Initialize")
        image = client.call("OpenImage", reference).value
        hasher = hashlib.sha256()
        start = time.perf_counter()
        got = client.call("GetBlob", image, digest, size)
        result: list[int] = []
        reader = threading.Thread(target=lambda: result.append(read_to_eof(got.fds[0], hasher)))
        reader.start()
        client.call("FinishPipe", got.pipeid)
        reader.join(timeout)
        elapsed = time.perf_counter() - start
        assert result == [size] and f"sha256:{hasher.hexdigest()}" == digest, "the blob arrived wrong"
        return size / elapsed / 1e6
    finally:
        client.close()


def measure(daemon_listen: Path, log: Path, reference: str, digest: str, size: int, round_trips: int, timeout: float):
    return (
        round_trip_rate(daemon_listen, log, reference, round_trips, timeout),
        blob_throughput(daemon_listen, log, reference, digest, size, timeout),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--blob-mb", type=int, default=256)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--modes",
        default="off,on",
        help="which daemons: off, on, or both (default off,on); a checkout from before metrics has only off",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        work = Path(tmp)
        (layer,) = build_layers_layout(work / "layout", [args.blob_mb * 1_000_000], "metrics cost")
        registry_cm = docker_registry(work / "registry")
        registry = registry_cm.__enter__()
        try:
            push(work / "layout", registry, args.timeout)
            reference = f"docker://{registry.authority}/{REPOSITORY}:{TAG}"
            modes = args.modes.split(",")
            results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
            scrapes = 0
            for round_ in range(args.rounds + 1):  # round 0: warm-up, not counted
                for mode in modes:
                    port = free_port()
                    extra = ["--metrics-listen", f"127.0.0.1:{port}"] if mode == "on" else []
                    with image_proxy_daemon(work / f"daemon-{mode}", args.timeout, extra) as daemon:
                        scraper = None
                        if mode == "on":
                            scraper = Scraper(f"http://127.0.0.1:{port}/metrics", args.scrape_interval)
                            scraper.start()
                        try:
                            got = measure(
                                daemon.listen,
                                daemon.log,
                                reference,
                                layer.digest,
                                layer.size,
                                args.round_trips,
                                args.timeout,
                            )
                        finally:
                            if scraper is not None:
                                scraper.done.set()
                                scraper.join()
                                scrapes += scraper.count if round_ else 0
                    if round_:
                        results[mode].append(got)
                    print(
                        f"round {round_} metrics {mode}: {got[0]:.0f} round trips/s, {got[1]:.0f} MB/s", file=sys.stderr
                    )
        finally:
            registry_cm.__exit__(None, None, None)
    print(f"| metrics | round trips/s (median of {args.rounds}) | µs per round trip | GetBlob MB/s (median) |")
    print("|---|---|---|---|")
    for mode, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        speed = statistics.median(s for _, s in runs)
        print(f"| {mode} | {rate:.0f} | {1e6 / rate:.1f} | {speed:.0f} |")
    print(f"\n{scrapes} scrapes of /metrics during the measured rounds with metrics on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
