#!/usr/bin/env python3
"""Pulling a many-layer image through ONE proxy connection: in order (protocol 0.2.8) against request ids.

Set-up: a docker-registry on 127.0.0.1 holding one image of ``--layers`` layers of ``--layer-mb`` MB each (random,
incompressible bytes in a tar, gzip level 0), pushed with ``skopeo copy``. Every run spawns a proxy over a
socketpair and pulls the whole image with ``protocol.client.pull.pull`` (the same client code in every mode; the client
counts the bytes and checks sizes, the server checks digests; ``--client-verify`` makes the client hash too):

- ``ours-seq``:  our proxy, in order, one blob at a time: what an in-order client such as containers-image-proxy-rs
  does today, because a pending FinishPipe holds back every later call;
- ``ours-fifo``: our proxy, in order, ``--jobs`` blobs requested at once (replies matched FIFO);
- ``ours-ids``:  our proxy with request ids (``GetCapabilities`` lists ``request-ids``), ``--jobs`` at once;
- ``skopeo``:    ``skopeo experimental-image-proxy``, in order, ``--jobs`` at once (the bindings' fallback).

Two network conditions, each a full set of rounds:

- ``loopback``: straight to the registry. Everything is CPU-bound on a 2-core machine (registry, proxy, client);
- ``paced``: through a relay process that paces every TCP connection to ``--pace-mbps`` MB/s, as a CDN edge or a
  per-connection-shaped link does; the proxy opens one registry connection per blob in flight.

Run from the repository root with the project's interpreter:
``.venv/bin/python bench/parallel_pull.py [--layers 20] [--layer-mb 50] [--rounds 3] [--out bench/RESULTS.md]``.
The report goes between the markers ``<!-- parallel_pull.py: begin/end -->`` of ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import trio  # noqa: E402
from common import (  # noqa: E402
    MB,
    REPOSITORY,
    TAG,
    build_layers_layout,
    docker_registry,
    free_port,
    machine_info,
    median_range,
    push,
    stop_process,
    write_report,
)

from protocol.client import ImageProxy  # noqa: E402
from protocol.client.pull import pull  # noqa: E402

MODES = ("ours-seq", "ours-fifo", "ours-ids", "skopeo")
BEGIN = "<!-- parallel_pull.py: begin -->"
END = "<!-- parallel_pull.py: end -->"
RELAY_READ = 64 << 10


# ------------------------------------------------------------------------------------------- the pacing relay


async def _relay_main(listen_port: int, upstream_port: int, bytes_per_second: float) -> None:
    """Forward 127.0.0.1:listen_port to 127.0.0.1:upstream_port; the registry→client direction of each connection
    is paced to ``bytes_per_second`` (the client→registry direction, requests only, is not)."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, rate: float | None) -> None:
        start, sent = trio.current_time(), 0
        try:
            while data := await src.receive_some(RELAY_READ):
                await dst.send_all(data)
                sent += len(data)
                if rate is not None:
                    await trio.sleep_until(start + sent / rate)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(dst)

    async def handle(down: trio.SocketStream) -> None:
        try:
            up = await trio.open_tcp_stream("127.0.0.1", upstream_port)
        except OSError:
            await trio.aclose_forcefully(down)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, down, up, None)
            nursery.start_soon(pump, up, down, bytes_per_second)

    await trio.serve_tcp(handle, listen_port, host="127.0.0.1")


class PacingRelay:
    """The relay in a process of its own (so its CPU is not the client's)."""

    def __init__(self, upstream_port: int, mb_per_second: float) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--relay", str(self.port), str(upstream_port), str(mb_per_second * MB)]
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the pacing relay did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        stop_process(self.process)


# ------------------------------------------------------------------------------------------- one run


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, blob):
        counter = self

        class Writer:
            def write(self, chunk: bytes) -> None:
                counter.bytes += len(chunk)

            def commit(self) -> None:
                pass

            def discard(self) -> None:
                pass

        return Writer()


def run_once(mode: str, authority: str, jobs: int, verify: bool, timeout: float) -> tuple[float, int]:
    """One pull through one connection; returns (seconds from OpenImage to the last FinishPipe, bytes)."""
    if mode == "skopeo":
        argv: Sequence[str] | None = ["skopeo", "experimental-image-proxy", "--tls-verify=false"]
        extra: list[str] = []
    else:
        argv, extra = None, ["--tls-verify=false"]
    ids = mode == "ours-ids"
    concurrency = 1 if mode == "ours-seq" else jobs
    counter = _Counter()

    async def main() -> float:
        async with ImageProxy.spawn(argv, extra, request_ids=ids) as proxy:
            if proxy.uses_request_ids != ids:
                raise RuntimeError(f"{mode}: request ids {'not ' if ids else ''}in use")
            with trio.fail_after(timeout):
                started = time.perf_counter()
                await pull(
                    proxy, f"docker://{authority}/{REPOSITORY}:{TAG}", counter, concurrency=concurrency, verify=verify
                )
                return time.perf_counter() - started

    seconds = trio.run(main)
    return seconds, counter.bytes


# ------------------------------------------------------------------------------------------- report


def report(args, info, total, results: dict[tuple[str, str], list[tuple[float, int]]], conditions) -> str:
    lines = [
        BEGIN,
        "## Parallel pull through one connection: in order against request ids (`bench/parallel_pull.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {info.get('nproc', '?')} CPUs, {info.get('cpu', '?')}, {info.get('kernel', '?')}, "
        f"Python {sys.version.split()[0]}",
        f"- image: {args.layers} layers x {args.layer_mb} MB of random bytes (gzip level 0), "
        f"{total / MB:,.0f} MB of layers, in docker-registry on 127.0.0.1",
        f"- every run: a fresh proxy, one connection, `protocol.client.pull.pull` with --jobs {args.jobs}; "
        f"client hashing {'on' if args.client_verify else 'off (the servers check digests)'}; "
        f"{args.rounds} rounds, modes alternating within each round",
        "- **shared, noisy 2-core machine**: differences under ~10-15 % are noise",
        "",
        "Median (min to max) seconds from OpenImage to the last blob's FinishPipe, and MB/s of layer bytes:",
        "",
        "| condition | mode | seconds | MB/s | vs ours-seq | vs ours-fifo |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for condition in conditions:
        medians = {
            m: statistics.median(s for s, _ in results[(condition, m)])
            for m in args.modes
            if results.get((condition, m))
        }
        for mode in args.modes:
            runs = results.get((condition, mode))
            if not runs:
                continue
            seconds = [s for s, _ in runs]
            rates = [b / s / MB for s, b in runs]
            vs_seq = f"{medians['ours-seq'] / medians[mode]:.2f}x" if "ours-seq" in medians else "-"
            vs_fifo = f"{medians['ours-fifo'] / medians[mode]:.2f}x" if "ours-fifo" in medians else "-"
            lines.append(
                f"| {condition} | {mode} | {median_range(seconds, '.1f')} | {median_range(rates, '.0f')} "
                f"| {vs_seq} | {vs_fifo} |"
            )
    lines += ["", "Produced by `.venv/bin/python bench/parallel_pull.py`; see bench/README.md.", END]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relay", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--layer-mb", type=int, default=50, help="MB (10^6 bytes) of random content per layer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4, help="blobs in flight for the concurrent modes (4)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--conditions", nargs="+", choices=("loopback", "paced"), default=["loopback", "paced"])
    parser.add_argument("--pace-mbps", type=float, default=40.0, help="MB/s per TCP connection when paced (40)")
    parser.add_argument("--client-verify", action="store_true", help="the client hashes every byte too")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.relay:
        listen, upstream, rate = args.relay
        trio.run(_relay_main, int(listen), int(upstream), float(rate))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="parallel-pull-", dir=args.workdir))
    try:
        print(f"building {args.layers} x {args.layer_mb} MB layers in {workdir}", file=sys.stderr)
        layers = build_layers_layout(
            workdir / "layout", [args.layer_mb * 1_000_000] * args.layers, "bench/parallel_pull.py"
        )
        total = sum(layer.size for layer in layers)
        with docker_registry(workdir / "registry") as registry:
            push(workdir / "layout", registry, 1800)
            shutil.rmtree(workdir / "layout")
            results: dict[tuple[str, str], list[tuple[float, int]]] = {}
            for condition in args.conditions:
                relay = PacingRelay(registry.port, args.pace_mbps) if condition == "paced" else None
                authority = f"127.0.0.1:{relay.port}" if relay else registry.authority
                try:
                    for round_number in range(1, args.rounds + 1):
                        for mode in args.modes:
                            seconds, got = run_once(mode, authority, args.jobs, args.client_verify, args.timeout)
                            if got < total:
                                raise RuntimeError(f"{mode}: got {got} bytes, expected at least {total}")
                            results.setdefault((condition, mode), []).append((seconds, got))
                            print(
                                f"{condition} round {round_number} {mode}: {seconds:.2f} s, "
                                f"{got / seconds / MB:.0f} MB/s",
                                file=sys.stderr,
                            )
                finally:
                    if relay:
                        relay.close()
        section = report(args, machine_info(), total, results, args.conditions)
        if args.pace_mbps and "paced" in args.conditions:
            section = section.replace(
                "- **shared",
                f"- paced: every TCP connection to the registry limited to {args.pace_mbps:g} MB/s by a "
                "relay process\n- **shared",
                1,
            )
        write_report(args.out, section, BEGIN, END)
        print(section)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
