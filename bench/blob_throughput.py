#!/usr/bin/env python3
"""GetBlob throughput of a large blob from a real docker-registry on loopback: our proxy against skopeo's.

Set-up: a docker-registry on 127.0.0.1 with a temporary storage directory, an OCI layout holding one image whose
only layer is ``--size-mib`` MiB of random (incompressible) bytes in a tar, wrapped in gzip level 0 (stored
blocks: no compression work anywhere, and skopeo pushes it unchanged), pushed with ``skopeo copy``.

Each round spawns a server over a ``SOCK_SEQPACKET`` socketpair (the socket on its stdin), ours then skopeo's,
and runs Initialize, OpenImage, GetBlob, FinishPipe with a small synchronous client: the pipe fd is drained by a
thread (large reads, SHA-256 of every byte) while the main thread waits for the FinishPipe reply. See
bench/README.md for what each number means.

Run from the repository root: ``python bench/blob_throughput.py [--size-mib 1024] [--rounds 3]``.
Only the standard library is used; ``--py-spy-out`` needs py-spy (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    GB,
    MB,
    MIB,
    REPO_ROOT,
    REPOSITORY,
    TAG,
    TRANSFER_METRICS,
    BlobTransfer,
    Layer,
    RunningRegistry,
    build_layout,
    docker_registry,
    measure_get_blob,
    median_range,
    push,
    ratio_of_medians,
    report_header,
    start_bench,
    write_report,
)

OURS = "ours"
SKOPEO = "skopeo"

BEGIN_MARK = "<!-- blob_throughput.py: begin -->"
END_MARK = "<!-- blob_throughput.py: end -->"


def server_argv(name: str) -> list[str]:
    if name == OURS:
        return [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]
    return ["skopeo", "experimental-image-proxy", "--tls-verify=false"]


# ------------------------------------------------------------------------------------------- measurements


@dataclass
class ReferenceRun:
    name: str
    round: int
    bytes: int
    wall: float
    cpu: float  # the command's user + system CPU (wait4 rusage)

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.wall


def run_server(
    name: str,
    round_no: int,
    registry: RunningRegistry,
    layer: Layer,
    workdir: Path,
    args: argparse.Namespace,
    argv: Sequence[str] | None = None,
) -> BlobTransfer:
    run = measure_get_blob(
        name,
        round_no,
        argv or server_argv(name),
        registry.authority,
        registry,
        layer,
        workdir,
        args.read_size_kib * 1024,
        not args.no_hash,
        args.timeout,
    )
    if args.verbose:
        print(f"  {name} (protocol {run.protocol}) round {round_no}: {run.mb_s:.0f} MB/s", flush=True)
    return run


def run_reference(name: str, round_no: int, argv: Sequence[str], size: int) -> ReferenceRun:
    start = time.perf_counter()
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return ReferenceRun(name, round_no, size, wall, usage.ru_utime + usage.ru_stime)


def profile_ours(registry: RunningRegistry, layer: Layer, workdir: Path, args: argparse.Namespace) -> None:
    """One extra, unmeasured transfer with our server under ``py-spy record`` (collapsed stacks / flamegraph)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.py_spy_out).resolve()
    fmt = "flamegraph" if out.suffix == ".svg" else "raw"
    argv = [py_spy, "record", "--rate", "250", "--format", fmt, "--output", str(out), "--", *server_argv(OURS)]
    run = run_server(OURS, 0, registry, layer, workdir, args, argv=argv)
    print(f"py-spy: {run.mb_s:.0f} MB/s under the profiler, profile in {out}", flush=True)


# ------------------------------------------------------------------------------------------- report


def render(
    runs: list[BlobTransfer], refs: list[ReferenceRun], layer: Layer, args: argparse.Namespace, machine: dict[str, str]
) -> str:
    hashing = "off (--no-hash)" if args.no_hash else "on (SHA-256 of every byte, checked against the digest)"
    lines = [
        BEGIN_MARK,
        "# GetBlob throughput: image-proxy vs skopeo experimental-image-proxy",
        "",
        *report_header(machine),
        f"- blob: {layer.size:,} bytes ({args.size_mib} MiB of random bytes in a tar, gzip level 0), "
        f"docker-registry on 127.0.0.1 (plain HTTP, filesystem storage, page cache warm)",
        f"- rounds: {args.rounds}, alternating {OURS}, {SKOPEO}, {OURS}, {SKOPEO}, ...; "
        f"client read size {args.read_size_kib} KiB; client hashing {hashing}",
        "- **the machine is shared and noisy**: treat differences under ~10-15 % as noise; the min to max ranges show "
        "the spread",
        "",
        "Median (min to max) over the rounds; ratio = ours / skopeo of the medians.",
        "",
        f"| metric | {OURS} | {SKOPEO} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, fmt, get in TRANSFER_METRICS:
        ours = [get(r) for r in runs if r.case == OURS]
        theirs = [get(r) for r in runs if r.case == SKOPEO]
        ratio = ratio_of_medians(ours, theirs)
        lines.append(f"| {label} | {median_range(ours, fmt)} | {median_range(theirs, fmt)} | {ratio} |")
    if refs:
        lines += ["", "References (same blob, same rounds):", "", "| reference | MB/s | CPU s/GB |", "|---|---:|---:|"]
        for name in dict.fromkeys(r.name for r in refs):
            mine = [r for r in refs if r.name == name]
            cpu = [r.cpu / (r.bytes / GB) for r in mine]
            lines.append(f"| {name} | {median_range([r.mb_s for r in mine], '.0f')} | {median_range(cpu, '.2f')} |")
    lines += [
        "",
        "Every round:",
        "",
        "| round | server | MB/s | wall s | server CPU s | whole-process CPU s | peak RSS MiB | client CPU s "
        "| registry CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.round} | {r.case} | {r.mb_s:.0f} | {r.wall:.2f} | {r.server_cpu:.2f} | {r.server_cpu_total:.2f} "
            f"| {r.server_hwm / MIB:.1f} | {r.client_cpu:.2f} | {r.registry_cpu:.2f} |"
        )
    lines += ["", "Produced by `python bench/blob_throughput.py`; see bench/README.md.", END_MARK, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="layer content size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs ours then skopeo (default 3)")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="Markdown file whose section to write"
    )
    parser.add_argument("--read-size-kib", type=int, default=1024, help="client read size per read (default 1024)")
    parser.add_argument("--no-hash", action="store_true", help="do not SHA-256 the bytes in the client")
    parser.add_argument("--no-references", action="store_true", help="skip the sha256sum and curl references")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on every reply and on the drain, s")
    parser.add_argument("--workdir", help="where to put the layout and registry storage (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--py-spy-out", help="after the rounds, profile one transfer of ours with py-spy into FILE")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress lines")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1 or args.read_size_kib < 1:
        parser.error("--size-mib, --rounds and --read-size-kib must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = start_bench(args.workdir, "blob-bench-", args.verbose)
    if bench is None:
        return 2
    machine, workdir, progress = bench.machine, bench.workdir, bench.progress
    try:
        started = time.perf_counter()
        layer, _ = build_layout(workdir / "layout", args.size_mib * MIB)
        progress(f"layout: {layer.size:,} bytes, {layer.digest} ({time.perf_counter() - started:.1f} s)")
        with docker_registry(workdir / "registry") as registry:
            started = time.perf_counter()
            push(workdir / "layout", registry, args.timeout)
            progress(f"pushed to {registry.authority}/{REPOSITORY}:{TAG} ({time.perf_counter() - started:.1f} s)")
            curl = shutil.which("curl")
            curl_argv = [curl, "-s", "-f", "-o", "/dev/null", registry.blob_url(layer.digest)] if curl else None
            if curl_argv:  # warm the registry's page cache and check the blob is served
                run_reference("warm-up", 0, curl_argv, layer.size)
            runs: list[BlobTransfer] = []
            refs: list[ReferenceRun] = []
            for round_no in range(1, args.rounds + 1):
                for name in (OURS, SKOPEO):
                    runs.append(run_server(name, round_no, registry, layer, workdir, args))
                if not args.no_references:
                    refs.append(
                        run_reference(
                            "sha256sum of the layer file", round_no, ["sha256sum", str(layer.path)], layer.size
                        )
                    )
                    if curl_argv:
                        refs.append(
                            run_reference("curl -s -o /dev/null of the blob URL", round_no, curl_argv, layer.size)
                        )
            if args.py_spy_out:
                profile_ours(registry, layer, workdir, args)
        report = render(runs, refs, layer, args, machine)
        write_report(Path(args.out), report, BEGIN_MARK, END_MARK)
        print(report)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
