#!/usr/bin/env python3
"""N clients pulling the same image at once: one ``image-proxy daemon`` shared by all of them, against one
spawned ``skopeo experimental-image-proxy`` per client (what update agents do today).

Set-up: a docker-registry on 127.0.0.1 holding one image of ``--layers`` layers of ``--layer-mb`` MB each
(random, incompressible bytes in a tar, stored as gzip level 0), pushed with ``skopeo copy``. Every server reaches
the registry through a counting TCP relay, which gives the bytes fetched upstream.

Per number of clients N (``--clients 1,10,50``) and round, the modes run one after the other:

- ``daemon``: ``python -m proxy daemon --listen SOCK --blob-cache DIR`` with a fresh empty DIR, started before the
  clock (ready when it sends ``READY=1`` on ``$NOTIFY_SOCKET``); the N clients connect to SOCK;
- ``skopeo``: each client spawns ``skopeo experimental-image-proxy`` on a socketpair;
- ``ours-spawned`` (``--modes``, on by default): each client spawns ``python -m proxy experimental-image-proxy``
  without a cache, for reference.

Each client is a thread of this process doing what an update agent does, in order: (spawn or connect),
Initialize, OpenImage, GetManifest (the bytes checked against the digest the reply names, the layers against the
pushed ones), then GetBlob + FinishPipe of every layer, draining the pipe and checking size and SHA-256. All N
threads start together; the wall time runs until the last client has verified its last layer.

Run from anywhere: ``python bench/daemon_clients.py [--clients 1,10,50] [--layers 5] [--layer-mb 20]
[--rounds 3] [--large-rounds 3]``. Standard library only. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    MB,
    MIB,
    REPO_ROOT,
    REPOSITORY,
    TAG,
    CountingRelay,
    Drain,
    Layer,
    ProtocolError,
    ProxyClient,
    Reply,
    RunningRegistry,
    SocketClient,
    build_layers_layout,
    counting_relay,
    docker_registry,
    image_proxy_daemon,
    median_range,
    proc_cpu,
    proc_hwm_bytes,
    push,
    report_header,
    self_cpu,
    start_bench,
    write_report,
)

DAEMON = "daemon"
SKOPEO = "skopeo"
OURS_SPAWNED = "ours-spawned"
MODES = (DAEMON, SKOPEO, OURS_SPAWNED)

BEGIN_MARK = "<!-- daemon_clients.py: begin -->"
END_MARK = "<!-- daemon_clients.py: end -->"

#: registry connections the relay accepts at once, per client (a spawned server opens one or two) and in all
RELAY_CONNECTIONS_PER_CLIENT = 4
RELAY_CONNECTIONS_SPARE = 16
#: relay read size: smaller than cache_bench's 1 MiB, since up to 2 x 4 x N pumps each hold a buffer
RELAY_READ_SIZE = 256 << 10


def spawned_argv(mode: str) -> list[str]:
    if mode == SKOPEO:
        return ["skopeo", "experimental-image-proxy", "--tls-verify=false"]
    return [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]


# ------------------------------------------------------------------------------------------- one client


@dataclass(frozen=True)
class Image:
    reference: str
    layers: tuple[Layer, ...]

    @property
    def layer_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class ClientSettings:
    read_size: int  # bytes per pipe read
    timeout: float  # bound on every reply and every drain


def pull_image(client: SocketClient, image: Image, settings: ClientSettings) -> int:
    """Initialize, OpenImage, GetManifest, GetBlob + FinishPipe of every layer, every byte checked; CloseImage.
    Returns the bytes delivered through the pipes (manifest and layers)."""
    client.call("Initialize")
    image_id = client.call("OpenImage", image.reference).value
    reply = client.call("GetManifest", image_id)
    manifest = _read_pipe(client, reply, settings, keep=True)
    if manifest.sha256 != reply.value:
        raise ProtocolError(f"GetManifest: the manifest hashes to {manifest.sha256}, the reply says {reply.value}")
    listed = [(entry["digest"], entry["size"]) for entry in json.loads(bytes(manifest.data))["layers"]]
    if listed != [(layer.digest, layer.size) for layer in image.layers]:
        raise ProtocolError(f"GetManifest: the manifest lists {listed}, not the pushed layers")
    delivered = manifest.size
    for layer in image.layers:
        reply = client.call("GetBlob", image_id, layer.digest, layer.size)
        blob = _read_pipe(client, reply, settings)
        if reply.value != layer.size or blob.size != layer.size or blob.sha256 != layer.digest:
            raise ProtocolError(
                f"GetBlob {layer.digest}: the reply said {reply.value} bytes, read {blob.size} bytes hashing to "
                f"{blob.sha256}; expected {layer.size}"
            )
        delivered += blob.size
    client.call("CloseImage", image_id)
    return delivered


def _read_pipe(client: SocketClient, reply: Reply, settings: ClientSettings, keep: bool = False) -> Drain:
    """Drain the reply's pipe (SHA-256 of every byte) while FinishPipe is sent; both must succeed."""
    if len(reply.fds) != 1:
        for fd in reply.fds:
            os.close(fd)
        raise ProtocolError(f"expected one pipe fd, got {len(reply.fds)}")
    drain = Drain(reply.fds[0], settings.read_size, True, keep)
    try:
        client.call("FinishPipe", reply.pipeid)
    finally:
        drain.join(settings.timeout)
    return drain


@dataclass
class ClientRun:
    """One client of a run."""

    number: int
    done: float = 0.0  # perf_counter() when its last layer was verified
    delivered: int = 0
    server_cpu: float = 0.0  # spawned: its server's whole-process CPU, read just before Shutdown
    server_hwm: int = 0  # spawned: its server's VmHWM, read just before Shutdown
    error: BaseException | None = None
    log_tail: str = ""


def run_client(
    connect: Callable[[int], SocketClient],
    run: ClientRun,
    image: Image,
    start: threading.Barrier,
    settings: ClientSettings,
) -> None:
    """A client thread's body: wait for the start, connect (or spawn), pull; errors are kept in ``run``."""
    client: SocketClient | None = None
    try:
        start.wait(settings.timeout)
        client = connect(run.number)
        run.delivered = pull_image(client, image, settings)
        run.done = time.perf_counter()
        if isinstance(client, ProxyClient):
            run.server_cpu = proc_cpu(client.pid)
            run.server_hwm = proc_hwm_bytes(client.pid)
    except BaseException as e:
        run.error = e
        run.log_tail = client.log_tail() if client is not None else ""
    finally:
        if client is not None:
            client.close()


def run_clients(
    connect: Callable[[int], SocketClient], n: int, image: Image, settings: ClientSettings
) -> tuple[float, list[ClientRun]]:
    """N client threads released together. Returns the start time and the clients' runs; raises the first error."""
    start = threading.Barrier(n + 1)
    runs = [ClientRun(number) for number in range(n)]
    threads = [
        threading.Thread(target=run_client, args=(connect, run, image, start, settings), name=f"client-{run.number}")
        for run in runs
    ]
    for thread in threads:
        thread.start()
    try:
        start.wait(settings.timeout)
        started = time.perf_counter()
    finally:
        # every call and drain of a client is bounded by the timeout; a pull makes 2 calls per blob plus 6
        bound = settings.timeout * (2 * len(image.layers) + 8)
        deadline = time.monotonic() + bound
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        raise RuntimeError(f"{len(stuck)} clients still running after {bound:.0f} s: {', '.join(stuck[:5])}")
    failed = [run for run in runs if run.error is not None]
    if failed:
        first = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {n} clients failed; client {first.number}: {first.error!r}\n{first.log_tail}"
        ) from first.error
    return started, runs


# ------------------------------------------------------------------------------------------- one run


@dataclass
class Run:
    mode: str
    clients: int
    round: int
    wall: float  # clients released -> the last client's last layer verified
    first_done: float  # clients released -> the first client done
    delivered: int  # bytes read from the pipes by all clients
    upstream: int  # bytes the relay read from the registry (TCP payload, HTTP headers included)
    server_cpu: float  # daemon: CPU while the clients ran; spawned: sum of the whole processes' CPU
    server_hwm: int  # daemon: its VmHWM; spawned: the sum of the processes' VmHWM
    server_hwm_max: int  # the largest VmHWM of one server process
    server_cpu_startup: float  # daemon: CPU from exec to READY=1 (not in server_cpu); spawned: 0
    registry_cpu: float  # docker-registry's CPU over the run
    bench_cpu: float  # this process's CPU over the run: the clients (pipe reads, SHA-256) and the relay

    @property
    def mb_s(self) -> float:
        return self.delivered / MB / self.wall


def measure(
    mode: str,
    n: int,
    round_no: int,
    image: Image,
    registry: RunningRegistry,
    relay: CountingRelay,
    workdir: Path,
    args: argparse.Namespace,
) -> Run:
    settings = ClientSettings(args.read_size_kib * 1024, args.timeout)
    relay.wait_idle(args.timeout)
    upstream0 = relay.upstream_bytes
    registry0 = proc_cpu(registry.process.pid)
    if mode == DAEMON:
        with image_proxy_daemon(workdir / "daemon", args.timeout) as daemon:
            startup_cpu = proc_cpu(daemon.process.pid)
            bench0 = self_cpu()
            started, runs = run_clients(
                lambda number: SocketClient.connect(daemon.listen, args.timeout, daemon.log), n, image, settings
            )
            server_cpu = proc_cpu(daemon.process.pid) - startup_cpu
            hwm = hwm_max = proc_hwm_bytes(daemon.process.pid)
    else:
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        startup_cpu = 0.0
        bench0 = self_cpu()
        started, runs = run_clients(
            lambda number: ProxyClient(spawned_argv(mode), logs / f"{mode}-{n}-{round_no}-{number}.log", args.timeout),
            n,
            image,
            settings,
        )
        server_cpu = sum(run.server_cpu for run in runs)
        hwm, hwm_max = sum(run.server_hwm for run in runs), max(run.server_hwm for run in runs)
    relay.wait_idle(args.timeout)  # every server is gone: their registry connections are closed and counted
    bench_cpu = self_cpu() - bench0
    if relay.refused:
        raise RuntimeError(f"the relay refused {relay.refused} registry connections (raise its limit)")
    return Run(
        mode=mode,
        clients=n,
        round=round_no,
        wall=max(run.done for run in runs) - started,
        first_done=min(run.done for run in runs) - started,
        delivered=sum(run.delivered for run in runs),
        upstream=relay.upstream_bytes - upstream0,
        server_cpu=server_cpu,
        server_hwm=hwm,
        server_hwm_max=hwm_max,
        server_cpu_startup=startup_cpu,
        registry_cpu=proc_cpu(registry.process.pid) - registry0,
        bench_cpu=bench_cpu,
    )


# ------------------------------------------------------------------------------------------- report


def _median(runs: Sequence[Run], get: Callable[[Run], float]) -> float:
    return statistics.median(get(run) for run in runs)


def render(runs: list[Run], image: Image, args: argparse.Namespace, machine: dict[str, str], load: str) -> str:
    layers = image.layer_bytes
    counts = sorted({run.clients for run in runs})
    modes = [mode for mode in MODES if any(run.mode == mode for run in runs)]
    rounds = ", ".join(f"N={n}: {max(run.round for run in runs if run.clients == n)}" for n in counts)
    lines = [
        BEGIN_MARK,
        "## N clients pulling one image: one daemon against one spawned proxy per client (`bench/daemon_clients.py`)",
        "",
        *report_header(machine),
        f"- image: {len(image.layers)} layers x {args.layer_mb} MB of random bytes (gzip level 0), {layers:,} bytes "
        f"of layer blobs, in docker-registry on 127.0.0.1 (plain HTTP), reached through a counting TCP relay",
        "- every client: a thread of the bench, Initialize, OpenImage, GetManifest, then GetBlob + FinishPipe of each "
        "layer in order, every byte SHA-256-checked; all N released together",
        f"- daemon: `image-proxy daemon` with a fresh empty `--blob-cache` per run; rounds: {rounds} "
        "(modes one after the other within a round)",
        f"- **shared, noisy 2-core machine** (load average {load}); differences under ~10-15 % are noise",
        "",
        "Median (min to max) over the rounds. *upstream* is what the relay read from the registry, as a multiple of "
        "the image's layer bytes; *server CPU* is the daemon's CPU while the clients ran (its start-up is "
        "separate), or the sum over the spawned processes (start-up included); *RSS* is the daemon's peak, or the "
        "sum of the spawned processes' peaks (largest one in brackets).",
        "",
        "| N | mode | wall s (last client done) | aggregate MB/s | upstream MB | upstream / image | server CPU s "
        "| server peak RSS MiB | registry CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in counts:
        for mode in modes:
            group = [run for run in runs if run.clients == n and run.mode == mode]
            if not group:
                continue
            rss = median_range([run.server_hwm / MIB for run in group], ".0f")
            if mode != DAEMON:
                rss += f" [{_median(group, lambda run: run.server_hwm_max / MIB):.0f}]"
            lines.append(
                f"| {n} | {mode} | {median_range([run.wall for run in group], '.2f')} "
                f"| {median_range([run.mb_s for run in group], '.0f')} "
                f"| {median_range([run.upstream / MB for run in group], '.0f')} "
                f"| {median_range([run.upstream / layers for run in group], '.3f')} "
                f"| {median_range([run.server_cpu for run in group], '.2f')} | {rss} "
                f"| {median_range([run.registry_cpu for run in group], '.2f')} |"
            )
    lines += ["", "Against skopeo (ratios of the medians):", "", "| N | mode | wall | upstream bytes | server CPU |"]
    lines.append("|---:|---|---:|---:|---:|")
    for n in counts:
        base = [run for run in runs if run.clients == n and run.mode == SKOPEO]
        for mode in modes:
            group = [run for run in runs if run.clients == n and run.mode == mode]
            if mode == SKOPEO or not group or not base:
                continue
            cells = [
                f"{_median(group, get) / _median(base, get):.2f}x"
                for get in (lambda r: r.wall, lambda r: r.upstream, lambda r: r.server_cpu)
            ]
            lines.append(f"| {n} | {mode} | {' | '.join(cells)} |")
    startup = [run.server_cpu_startup for run in runs if run.mode == DAEMON]
    if startup:
        lines += [
            "",
            f"The daemon's own start-up (exec to READY=1): {median_range(startup, '.2f')} CPU s, not counted above.",
        ]
    lines += [
        "",
        "Every run:",
        "",
        "| N | round | mode | wall s | first client done s | delivered MB | upstream bytes | server CPU s "
        "| server RSS MiB | registry CPU s | bench CPU s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.clients} | {run.round} | {run.mode} | {run.wall:.2f} | {run.first_done:.2f} "
            f"| {run.delivered / MB:.0f} | {run.upstream:,} | {run.server_cpu:.2f} | {run.server_hwm / MIB:.0f} "
            f"| {run.registry_cpu:.2f} | {run.bench_cpu:.2f} |"
        )
    lines += ["", "Produced by `.venv/bin/python bench/daemon_clients.py`; see bench/README.md.", END_MARK, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be 1 or more: {text!r}")
    return counts


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; not {', '.join(unknown) or 'none'}")
    return modes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=_counts, default=[1, 10, 50], help="client counts N (default 1,10,50)")
    parser.add_argument("--modes", type=_modes, default=list(MODES), help=f"default {','.join(MODES)}")
    parser.add_argument("--layers", type=int, default=5, help="layers in the image (default 5)")
    parser.add_argument("--layer-mb", type=int, default=20, help="MB (10^6 bytes) of random bytes per layer (20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N (default 3)")
    parser.add_argument("--large-rounds", type=int, default=3, help="rounds for N >= --large-from (default 3)")
    parser.add_argument("--large-from", type=int, default=50, help="the N from which --large-rounds apply (50)")
    parser.add_argument("--read-size-kib", type=int, default=1024, help="client read size per read (default 1024)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on every reply and drain, s (300)")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="Markdown file whose section to write"
    )
    parser.add_argument("--workdir", help="where to put the layout, registry storage and caches (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress lines")
    args = parser.parse_args(argv)
    if min(args.layers, args.layer_mb, args.rounds, args.large_rounds, args.read_size_kib) < 1:
        parser.error("--layers, --layer-mb, the rounds and --read-size-kib must be 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = start_bench(args.workdir, "daemon-clients-", args.verbose)
    if bench is None:
        return 2
    machine, workdir, progress = bench.machine, bench.workdir, bench.progress
    load0 = os.getloadavg()[0]
    try:
        started = time.perf_counter()
        layers = build_layers_layout(
            workdir / "layout", [args.layer_mb * int(MB)] * args.layers, "bench/daemon_clients.py"
        )
        progress(f"layout: {len(layers)} layers, {sum(layer.size for layer in layers):,} bytes")
        max_connections = RELAY_CONNECTIONS_PER_CLIENT * max(args.clients) + RELAY_CONNECTIONS_SPARE
        with (
            docker_registry(workdir / "registry") as registry,
            counting_relay(registry.port, max_connections, RELAY_READ_SIZE) as relay,
        ):
            push(workdir / "layout", registry, args.timeout)
            progress(f"pushed to {registry.authority}/{REPOSITORY}:{TAG} ({time.perf_counter() - started:.1f} s)")
            image = Image(f"docker://{relay.authority}/{REPOSITORY}:{TAG}", tuple(layers))
            runs: list[Run] = []
            for n in args.clients:
                rounds = args.large_rounds if n >= args.large_from else args.rounds
                for round_no in range(1, rounds + 1):
                    for mode in args.modes:
                        run = measure(mode, n, round_no, image, registry, relay, workdir, args)
                        runs.append(run)
                        progress(
                            f"  N={n} round {round_no} {mode}: {run.wall:.2f} s, {run.mb_s:.0f} MB/s, upstream "
                            f"{run.upstream / image.layer_bytes:.3f}x, server CPU {run.server_cpu:.2f} s, "
                            f"RSS {run.server_hwm / MIB:.0f} MiB"
                        )
        load = (
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, which counts the bench's own "
            f"{max(args.clients)} spawned servers and client threads"
        )
        report = render(runs, image, args, machine, load)
        write_report(Path(args.out), report, BEGIN_MARK, END_MARK)
        print(report)
        progress(f"total {time.perf_counter() - started:.0f} s")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
