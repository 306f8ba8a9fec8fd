#!/usr/bin/env python3
"""The blob cache (``--blob-cache DIR``) measured: GetBlob of a cached blob against the network, and the bytes
fetched again after an interrupted pull, our proxy against skopeo's.

Set-up as in blob_throughput.py: a docker-registry on 127.0.0.1, one image whose only layer is ``--size-mib``
MiB of random bytes (a tar in gzip level 0), pushed with ``skopeo copy``; servers spawned over a
``SOCK_SEQPACKET`` socketpair and driven by a small synchronous client that drains the pipe in a thread.

1. **Cached GetBlob.** Each round runs, in this order: ours without a cache, skopeo, ours with an empty cache
   (the pull fills it), ours with that cache holding the blob. The cached run reaches the registry through a
   counting TCP relay, which shows that no byte came from the registry between GetBlob and FinishPipe.
2. **Interrupted pull.** Per round and per server, a pull through the counting relay; when ``--kill-at`` of the
   blob has come from the registry the relay SIGKILLs the server; a new server process pulls again to the end.
   Ours runs with ``--blob-cache DIR`` (the partial file survives and the pull resumes with a Range request);
   skopeo has no persistent partials. Reported: bytes fetched from the registry across both attempts against
   the blob size.

Run from anywhere: ``python bench/cache_bench.py [--size-mib 1024] [--rounds 3] [--kill-rounds 3]``.
Only the standard library is used. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    MIB,
    REPO_ROOT,
    REPOSITORY,
    TAG,
    TRANSFER_METRICS,
    BlobTransfer,
    CountingRelay,
    Drain,
    Layer,
    ProtocolError,
    ProxyClient,
    RunningRegistry,
    build_layout,
    counting_relay,
    docker_registry,
    measure_get_blob,
    median_range,
    push,
    ratio_of_medians,
    report_header,
    start_bench,
    write_report,
)

#: the cases of part 1, in the order each round runs them
OURS_NETWORK = "ours, no cache"
SKOPEO_NETWORK = "skopeo"
OURS_FILL = "ours, empty cache"
OURS_CACHED = "ours, blob cached"
CASES = (OURS_NETWORK, SKOPEO_NETWORK, OURS_FILL, OURS_CACHED)

OURS = "ours"
SKOPEO = "skopeo"

STAMP_XATTR = "user.image-proxy.verified"  # proxy/cache/store.py: a cached file checked at its current size/mtime


def ours_argv(cache: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]
    return [*argv, "--blob-cache", str(cache)] if cache is not None else argv


def skopeo_argv() -> list[str]:
    return ["skopeo", "experimental-image-proxy", "--tls-verify=false"]


# ------------------------------------------------------------------------------------------- part 1: cached GetBlob


def transfer(
    case: str,
    round_no: int,
    argv: Sequence[str],
    authority: str,
    registry: RunningRegistry,
    layer: Layer,
    workdir: Path,
    args: argparse.Namespace,
    relay: CountingRelay | None = None,
) -> BlobTransfer:
    """One server process: Initialize, OpenImage, then GetBlob of the layer drained to EOF, FinishPipe."""
    run = measure_get_blob(
        case,
        round_no,
        argv,
        authority,
        registry,
        layer,
        workdir,
        args.read_size_kib * 1024,
        not args.no_hash,
        args.timeout,
        relay,
    )
    if args.verbose:
        print(f"  {case}, round {round_no}: {run.mb_s:.0f} MB/s", flush=True)
    return run


def cached_path(cache: Path, layer: Layer) -> Path:
    algo, _, hexpart = layer.digest.partition(":")
    return cache / "blobs" / algo / hexpart


def clear_cache(cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)


def run_cached_rounds(
    registry: RunningRegistry, relay: CountingRelay, layer: Layer, workdir: Path, args: argparse.Namespace
) -> tuple[list[BlobTransfer], bool]:
    """Part 1. Returns the runs and whether the cached file carried the proxy's verification stamp (without it
    every lookup re-hashes the blob)."""
    cache = workdir / "cache-part1"
    runs: list[BlobTransfer] = []
    stamped = True
    for round_no in range(1, args.rounds + 1):
        direct = registry.authority
        runs.append(transfer(OURS_NETWORK, round_no, ours_argv(), direct, registry, layer, workdir, args))
        runs.append(transfer(SKOPEO_NETWORK, round_no, skopeo_argv(), direct, registry, layer, workdir, args))
        clear_cache(cache)
        runs.append(transfer(OURS_FILL, round_no, ours_argv(cache), direct, registry, layer, workdir, args))
        stored = cached_path(cache, layer)
        if not stored.is_file() or stored.stat().st_size != layer.size:
            raise RuntimeError(f"{OURS_FILL}: {stored} is not the {layer.size}-byte blob after the pull")
        try:
            stamped = stamped and bool(os.getxattr(stored, STAMP_XATTR))
        except OSError:
            stamped = False
        # the cached case goes through the relay: the registry is still asked for the manifest (OpenImage),
        # but no byte may come from it during GetBlob
        run = transfer(OURS_CACHED, round_no, ours_argv(cache), relay.authority, registry, layer, workdir, args, relay)
        if run.relayed_transfer:
            raise RuntimeError(f"{OURS_CACHED}: {run.relayed_transfer} bytes came from the registry during GetBlob")
        runs.append(run)
    shutil.rmtree(cache, ignore_errors=True)
    return runs, stamped


# ------------------------------------------------------------------------------------------- part 2: interrupted pull


@dataclass
class InterruptedPull:
    server: str
    round: int
    size: int
    setup_bytes: int  # bytes from the registry before GetBlob, both attempts (ping, manifest)
    first_blob_bytes: int  # bytes from the registry after GetBlob in the killed attempt
    first_delivered: int  # of those, the bytes the relay handed to the killed server's socket
    kept_bytes: int  # the partial file after the kill (0 for skopeo: it keeps none)
    second_blob_bytes: int  # bytes from the registry after GetBlob in the second attempt
    second_wall: float  # the second attempt's GetBlob -> end of transfer

    @property
    def total(self) -> int:
        """Everything read from the registry over both attempts."""
        return self.setup_bytes + self.first_blob_bytes + self.second_blob_bytes

    @property
    def refetched(self) -> int:
        """Bytes of the blob fetched more than once: blob-phase bytes of both attempts minus the blob size
        (includes the few hundred bytes of each blob response's headers)."""
        return self.first_blob_bytes + self.second_blob_bytes - self.size


def killed_attempt(
    argv: Sequence[str], relay: CountingRelay, layer: Layer, log: Path, args: argparse.Namespace
) -> tuple[int, int, int]:
    """A pull that the relay SIGKILLs when ``--kill-at`` of the blob has come from the registry. Returns
    (bytes before GetBlob, bytes after it, bytes after it delivered to the server's socket)."""
    start = relay.upstream_bytes
    client = ProxyClient(argv, log, args.timeout)
    try:
        client.call("Initialize")
        image = client.call("OpenImage", f"docker://{relay.authority}/{REPOSITORY}:{TAG}").value
        before = relay.upstream_bytes
        delivered = relay.delivered_bytes
        relay.arm_kill(client.pid, before + int(layer.size * args.kill_at))
        try:
            got = client.call("GetBlob", image, layer.digest, layer.size)
            drain = Drain(got.fds[0], args.read_size_kib * 1024, False)
            try:
                client.call("FinishPipe", got.pipeid)
            finally:
                drain.join(args.timeout)
        except (ProtocolError, OSError):
            pass  # the server was killed mid-transfer: the socket closed under the call
        finally:
            relay.disarm()
        status = client.process.wait(timeout=args.timeout)
        if relay.killed_at is None or status != -signal.SIGKILL:
            raise RuntimeError(f"the pull was not killed (exit status {status}, killed at {relay.killed_at})")
        relay.wait_idle(args.timeout)  # bytes already in flight to the dead process are counted too
        return before - start, relay.upstream_bytes - before, relay.delivered_bytes - delivered
    except BaseException:
        print(f"killed attempt ({argv[0]}) failed; server log tail:\n{client.log_tail()}", file=sys.stderr)
        raise
    finally:
        client.close()


def interrupted_pull(
    server: str,
    round_no: int,
    registry: RunningRegistry,
    relay: CountingRelay,
    layer: Layer,
    workdir: Path,
    args: argparse.Namespace,
) -> InterruptedPull:
    cache = workdir / "cache-part2"
    if server == OURS:
        clear_cache(cache)
        argv = ours_argv(cache)
    else:
        argv = skopeo_argv()
    setup1, first, delivered = killed_attempt(argv, relay, layer, workdir / f"killed-{server}-{round_no}.log", args)
    partial = cached_path(cache, layer).with_name(cached_path(cache, layer).name + ".partial")
    kept = partial.stat().st_size if server == OURS and partial.exists() else 0
    before = relay.upstream_bytes
    second = transfer(
        f"{server}, after the kill", round_no, argv, relay.authority, registry, layer, workdir, args, relay
    )
    relay.wait_idle(args.timeout)
    setup2 = second.relayed_setup - before if second.relayed_setup is not None else 0
    second_blob = relay.upstream_bytes - before - setup2
    if server == OURS:
        if not cached_path(cache, layer).is_file():
            raise RuntimeError(f"{server}: the blob is not in the cache after the second pull")
        shutil.rmtree(cache, ignore_errors=True)
    run = InterruptedPull(
        server, round_no, layer.size, setup1 + setup2, first, delivered, kept, second_blob, second.wall
    )
    if args.verbose:
        print(
            f"  interrupted pull, {server}, round {round_no}: killed after {first / MIB:.1f} MiB, kept "
            f"{kept / MIB:.1f} MiB, then fetched {second_blob / MIB:.1f} MiB; "
            f"re-downloaded {run.refetched / MIB:.2f} MiB",
            flush=True,
        )
    return run


# ------------------------------------------------------------------------------------------- report


INTERRUPTED_METRICS: list[tuple[str, str, Callable[[InterruptedPull], float]]] = [
    ("blob bytes from the registry before the kill, MiB", ".1f", lambda r: r.first_blob_bytes / MIB),
    ("of those, delivered to the server's socket, MiB", ".1f", lambda r: r.first_delivered / MIB),
    ("partial file kept after the kill, MiB", ".1f", lambda r: r.kept_bytes / MIB),
    ("blob bytes from the registry in the second pull, MiB", ".1f", lambda r: r.second_blob_bytes / MIB),
    ("total from the registry, both attempts, MiB", ".1f", lambda r: r.total / MIB),
    ("total / blob size", ".3f", lambda r: r.total / r.size),
    ("re-downloaded (blob bytes of both attempts - size), MiB", ".2f", lambda r: r.refetched / MIB),
    ("re-downloaded, % of the blob", ".2f", lambda r: 100 * r.refetched / r.size),
    ("second pull: GetBlob to end of transfer, s", ".2f", lambda r: r.second_wall),
]

BEGIN_MARK = "<!-- cache_bench.py: begin -->"
END_MARK = "<!-- cache_bench.py: end -->"


def render(
    runs: list[BlobTransfer],
    stamped: bool,
    pulls: list[InterruptedPull],
    layer: Layer,
    args: argparse.Namespace,
    machine: dict[str, str],
) -> str:
    hashing = "off (--no-hash)" if args.no_hash else "on (SHA-256 of every byte, checked against the digest)"
    lines = [
        BEGIN_MARK,
        "# Blob cache: GetBlob of a cached blob, and bytes re-downloaded after an interrupted pull",
        "",
        *report_header(machine),
        f"- blob: {layer.size:,} bytes ({args.size_mib} MiB of random bytes in a tar, gzip level 0), "
        "docker-registry on 127.0.0.1 (plain HTTP, filesystem storage, page cache warm)",
        f"- client read size {args.read_size_kib} KiB; client hashing {hashing}",
        "- **the machine is shared with other jobs and noisy**: treat differences under ~10-15 % as noise; the min "
        "to max ranges show the spread",
    ]
    if runs:
        relayed = [r for r in runs if r.relayed_transfer is not None]
        setup = [r.relayed_setup or 0 for r in relayed]
        stamp_text = "the verification stamp spares the lookup a re-hash" if stamped else "NOT stamped: re-hashed"
        lines += [
            "",
            f"## GetBlob of a cached blob next to the network ({args.rounds} rounds)",
            "",
            f"Each round runs {' then '.join(f'*{case}*' for case in CASES)}, each in a new server process. "
            "The cached case reads the cache file "
            "the empty-cache run of the same round wrote (which dropped it from the page cache as its reader read "
            "it: the cached read comes from the disk; "
            + stamp_text
            + "), and sends it with sendfile from a worker thread. It reached the registry through a counting relay: "
            f"{max(r.relayed_transfer or 0 for r in relayed)} bytes came from the registry between GetBlob and the "
            f"end of the transfer in every round (before GetBlob, {min(setup)} to {max(setup)} bytes: the /v2/ "
            "ping and the manifest of OpenImage).",
            "",
            "Median (min to max) over the rounds; the ratios are of the medians.",
            "",
            f"| metric | {' | '.join(CASES)} | cached / ours no cache | cached / skopeo |",
            "|---|" + "---:|" * (len(CASES) + 2),
        ]
        for label, fmt, get in TRANSFER_METRICS:
            values = {case: [get(r) for r in runs if r.case == case] for case in CASES}
            cells = " | ".join(median_range(values[case], fmt) for case in CASES)
            cached = values[OURS_CACHED]
            ratios = " | ".join(ratio_of_medians(cached, values[base]) for base in (OURS_NETWORK, SKOPEO_NETWORK))
            lines.append(f"| {label} | {cells} | {ratios} |")
    if pulls:
        kill_pct = f"{100 * args.kill_at:.0f} %"
        lines += [
            "",
            f"## Bytes re-downloaded after an interrupted pull ({args.kill_rounds} rounds)",
            "",
            f"A pull through a counting TCP relay in front of the registry; when {kill_pct} of the blob had come "
            "from the registry, the relay SIGKILLed the server; a new server process then pulled the blob again "
            "(bytes and digest checked). Ours ran with `--blob-cache DIR` (a new empty DIR each round); skopeo "
            "keeps no partial downloads. Counted: every byte the relay read from the registry (TCP payload: "
            "HTTP headers included); the setup before GetBlob (ping, manifest: "
            f"{min(r.setup_bytes for r in pulls):,} to {max(r.setup_bytes for r in pulls):,} bytes over both "
            "attempts) is in the total but not in the re-downloaded bytes.",
            "",
            "Median (min to max) over the rounds; ratio = ours / skopeo of the medians.",
            "",
            f"| metric | {OURS} | {SKOPEO} | ratio |",
            "|---|---:|---:|---:|",
        ]
        for label, fmt, get in INTERRUPTED_METRICS:
            ours = [get(r) for r in pulls if r.server == OURS]
            theirs = [get(r) for r in pulls if r.server == SKOPEO]
            ratio = ratio_of_medians(ours, theirs)
            lines.append(f"| {label} | {median_range(ours, fmt)} | {median_range(theirs, fmt)} | {ratio} |")
    if runs:
        lines += [
            "",
            "Every round of the cached GetBlob:",
            "",
            "| round | case | MB/s | wall s | server CPU s | whole-process CPU s | peak RSS MiB | client CPU s "
            "| registry CPU s | registry bytes during GetBlob |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            relayed = "direct" if r.relayed_transfer is None else f"{r.relayed_transfer:,}"
            lines.append(
                f"| {r.round} | {r.case} | {r.mb_s:.0f} | {r.wall:.2f} | {r.server_cpu:.2f} | {r.server_cpu_total:.2f} "
                f"| {r.server_hwm / MIB:.1f} | {r.client_cpu:.2f} | {r.registry_cpu:.2f} | {relayed} |"
            )
    if pulls:
        lines += [
            "",
            "Every interrupted pull (bytes):",
            "",
            "| round | server | before the kill | delivered | partial kept | second pull | setup (both) | total "
            "| re-downloaded |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in pulls:
            lines.append(
                f"| {p.round} | {p.server} | {p.first_blob_bytes:,} | {p.first_delivered:,} | {p.kept_bytes:,} "
                f"| {p.second_blob_bytes:,} "
                f"| {p.setup_bytes:,} | {p.total:,} | {p.refetched:,} |"
            )
    lines += ["", "Produced by `python bench/cache_bench.py`; see bench/README.md.", END_MARK, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="layer content size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the cached GetBlob part (default 3; 0 skips)")
    parser.add_argument(
        "--kill-rounds", type=int, default=3, help="rounds of the interrupted-pull part (default 3; 0 skips)"
    )
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill when this fraction has come (default 0.5)")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="Markdown file whose section to write"
    )
    parser.add_argument("--read-size-kib", type=int, default=1024, help="client read size per read (default 1024)")
    parser.add_argument("--no-hash", action="store_true", help="do not SHA-256 the bytes in the client")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on every reply and on the drain, s")
    parser.add_argument("--workdir", help="where to put the layout, registry storage and caches (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress lines")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.read_size_kib < 1 or args.rounds < 0 or args.kill_rounds < 0:
        parser.error("--size-mib and --read-size-kib must be positive, the rounds not negative")
    if not 0 < args.kill_at < 1:
        parser.error("--kill-at must be between 0 and 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = start_bench(args.workdir, "cache-bench-", args.verbose)
    if bench is None:
        return 2
    machine, workdir, progress = bench.machine, bench.workdir, bench.progress
    try:
        started = time.perf_counter()
        layer, _ = build_layout(workdir / "layout", args.size_mib * MIB)
        progress(f"layout: {layer.size:,} bytes, {layer.digest} ({time.perf_counter() - started:.1f} s)")
        with docker_registry(workdir / "registry") as registry, counting_relay(registry.port) as relay:
            started = time.perf_counter()
            push(workdir / "layout", registry, args.timeout)
            progress(f"pushed to {registry.authority}/{REPOSITORY}:{TAG} ({time.perf_counter() - started:.1f} s)")
            runs: list[BlobTransfer] = []
            stamped = True
            if args.rounds:
                progress("part 1: GetBlob of a cached blob")
                runs, stamped = run_cached_rounds(registry, relay, layer, workdir, args)
            pulls: list[InterruptedPull] = []
            if args.kill_rounds:
                progress("part 2: bytes re-downloaded after an interrupted pull")
            for round_no in range(1, args.kill_rounds + 1):
                for server in (OURS, SKOPEO):
                    pulls.append(interrupted_pull(server, round_no, registry, relay, layer, workdir, args))
        report = render(runs, stamped, pulls, layer, args, machine)
        write_report(Path(args.out), report, BEGIN_MARK, END_MARK)
        print(report)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
