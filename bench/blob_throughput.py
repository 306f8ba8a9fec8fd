#!/usr/bin/env python3
"""GetBlob throughput of a large blob from a real docker-registry on loopback: our proxy against skopeo's, over
plain HTTP, over TLS, and ours filling an empty blob cache.

Set-up: an OCI layout holding one image whose only layer is ``--size-mib`` MiB of random (incompressible) bytes in
a tar, wrapped in gzip level 0 (stored blocks: no compression work anywhere, and skopeo pushes it unchanged),
pushed with ``skopeo copy`` to a plain-HTTP docker-registry and to a TLS one (self-signed certificate made with
the ``openssl`` CLI), both on 127.0.0.1 and sharing nothing, as the paths need (``--paths``).

Each round spawns servers over a ``SOCK_SEQPACKET`` socketpair (the socket on its stdin), for every path ours
then skopeo's, and runs Initialize, OpenImage, GetBlob, FinishPipe with a small synchronous client: the pipe fd is
drained by a thread into a 1 MiB buffer (its size checked; with ``--hash``, its SHA-256 too: that costs the client
about 0.5 CPU s/GB on the two cores the servers and the registry share) while the main thread waits for the
FinishPipe reply (whose success says the server verified the digest).
With ``--before TREE`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/before <commit>``), that
tree's server runs too on the uncached paths, so a change is measured against what it replaces in the same run.
The cache paths run ours with ``--blob-cache`` of a new empty directory and check that the blob landed in it.
The daemon paths run the session on a connection to one ``image-proxy daemon --no-blob-cache`` started for the whole
run (the server measured is the daemon, over the transfer), the relay paths through ours spawned as a relay to that
daemon (``[spawned] daemon = SOCK``; the server measured is the daemon plus the relay).
See bench/README.md for what each number means.

Run from the repository root: ``python bench/blob_throughput.py [--size-mib 1024] [--rounds 3] [--paths tls]``.
Only the standard library is used; ``--py-spy-out`` needs py-spy (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
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
    Layer,
    ProxyClient,
    ReferenceRun,
    RunningDaemon,
    RunningRegistry,
    ServerProcess,
    SocketClient,
    build_layout,
    describe_tree,
    docker_registry,
    find_cached_blob,
    image_proxy_daemon,
    measure_session,
    median_range,
    push,
    ratio_of_medians,
    ref_hashlib,
    ref_http_read,
    reference_argv,
    report_header,
    run_reference,
    start_bench,
    tls_parameters,
    transfer_log,
    write_report,
)

OURS = "ours"
SKOPEO = "skopeo"
BEFORE = "before"

BEGIN_MARK = "<!-- blob_throughput.py: begin -->"
END_MARK = "<!-- blob_throughput.py: end -->"


#: what ours is on a path, in the order a round runs them on one registry
SPAWNED = "spawned"  # python -m proxy experimental-image-proxy, spawned for the transfer (skopeo runs on these too)
CACHE = "cache"  # the same with --blob-cache of a new empty directory (skopeo has no cache)
DAEMON = "daemon"  # a connection to the running daemon (--no-blob-cache)
RELAY = "relay"  # ours spawned as a relay to that daemon ([spawned] daemon = SOCK)
KINDS = (SPAWNED, CACHE, DAEMON, RELAY)


@dataclass(frozen=True)
class BenchPath:
    """One row of the report: what ours does, and which skopeo run it is compared with."""

    name: str
    tls: bool  # the TLS registry (else the plain-HTTP one)
    kind: str  # one of KINDS
    base: str | None  # for the other kinds: the spawned path on the same registry (its skopeo column, its baseline)
    what: str
    daemon: str | None = None  # for a relay path: the direct daemon path on the same registry, compared too

    @property
    def skopeo_path(self) -> str:
        """The path whose skopeo runs fill this row's skopeo column."""
        return self.base or self.name

    @property
    def through_daemon(self) -> bool:
        return self.kind in (DAEMON, RELAY)


#: every path, in report order
PATHS: dict[str, BenchPath] = {
    p.name: p
    for p in (
        BenchPath("plain", False, SPAWNED, None, "GetBlob from the plain-HTTP registry"),
        BenchPath("tls", True, SPAWNED, None, "GetBlob from the TLS registry (both servers `--tls-verify=false`)"),
        BenchPath(
            "tls-cache",
            True,
            CACHE,
            "tls",
            "ours with `--blob-cache DIR`, DIR a new empty directory each round, over TLS: the pull downloads into the "
            "cache while serving the pipe. skopeo has no such cache: **its column is skopeo's `tls` run**",
        ),
        BenchPath(
            "plain-cache",
            False,
            CACHE,
            "plain",
            "as `tls-cache` over plain HTTP; **the skopeo column is skopeo's `plain` run**",
        ),
        *(
            path
            for transport, tls in (("plain", False), ("tls", True))
            for path in (
                BenchPath(
                    f"{transport}-daemon",
                    tls,
                    DAEMON,
                    transport,
                    f"ours as a running `image-proxy daemon --tls-verify=false --no-blob-cache` (one for the whole "
                    f"run), the session on a direct connection to its socket; the server measured is the daemon, "
                    f"over the transfer (CPU, and VmHWM reset when GetBlob is sent); its whole-process CPU row is its "
                    f"CPU over the session (connect to the end of the transfer). **The skopeo column is skopeo's "
                    f"`{transport}` run** (spawned)",
                ),
                BenchPath(
                    f"{transport}-relay",
                    tls,
                    RELAY,
                    transport,
                    f"ours spawned as a relay to that daemon (`python -m proxy experimental-image-proxy --config "
                    f'FILE`, FILE `[spawned] daemon = "SOCK"`; the blob pipe comes from the daemon, the relay passes '
                    f"packets and fds on); the server measured is the daemon (as in `{transport}-daemon`) plus the "
                    f"relay process (from exec: whole-process peak RSS). **The skopeo column is skopeo's "
                    f"`{transport}` run** (spawned)",
                    daemon=f"{transport}-daemon",
                ),
            )
        ),
    )
}

#: what a cache path must reach against its uncached baseline and against skopeo (throughput, ratio of medians)
CACHE_TARGETS = {"tls-cache": (0.9, 2.0)}


def server_argv(name: str, cache: Path | None = None, before: Path | None = None) -> list[str]:
    if name == BEFORE:
        # the earlier tree first on the path; -P: not the current directory's proxy package
        assert before is not None
        python = [sys.executable, "-P", "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]
        return ["env", f"PYTHONPATH={before}", *python]
    if name == OURS:
        argv = [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]
        return [*argv, "--blob-cache", str(cache)] if cache is not None else argv
    return ["skopeo", "experimental-image-proxy", "--tls-verify=false"]


def measured_paths(selected: Sequence[str]) -> list[str]:
    """The paths to measure, in report order: the selected ones, their bases and the daemon paths of the selected
    relay paths."""
    wanted = set(selected)
    for name in selected:
        wanted |= {other for other in (PATHS[name].base, PATHS[name].daemon) if other}
    return [name for name in PATHS if name in wanted]


# ------------------------------------------------------------------------------------------- measurements


@dataclass
class Run:
    """One measured server process: which path, which server, the transfer, and for a cache path the entry found."""

    path: str
    server: str
    transfer: BlobTransfer
    cache_entry: str = ""  # the cache file, relative to the cache directory


#: what a relay that serves its client itself, instead of relaying it to the daemon, logs (proxy/cli/main.py)
SERVED_HERE = "serving this client here"


class Bench:
    """The registries, the layer, the daemon (daemon and relay paths) and the options of one run: runs servers and
    references."""

    def __init__(
        self,
        registries: dict[bool, RunningRegistry],
        layer: Layer,
        workdir: Path,
        args: argparse.Namespace,
        daemon: RunningDaemon | None = None,
    ) -> None:
        self.registries = registries  # by tls
        self.layer = layer
        self.workdir = workdir
        self.args = args
        self.daemon = daemon

    def _session(
        self, spec: BenchPath, case: str, round_no: int, argv: list[str]
    ) -> tuple[SocketClient, list[ServerProcess]]:
        """The client of one measured session on ``spec`` and the processes it counts as the server: a spawned
        server (``argv``); the running daemon on a direct connection; or the daemon and a relay spawned to it."""
        log = transfer_log(self.workdir, case, round_no)
        if not spec.through_daemon:
            client = ProxyClient(argv, log, self.args.timeout)
            return client, [ServerProcess(client.pid)]
        assert self.daemon is not None
        servers = [ServerProcess.already_running(self.daemon.process.pid)]  # its CPU counts from here
        if spec.kind == DAEMON:
            return SocketClient.connect(self.daemon.listen, self.args.timeout, self.daemon.log), servers
        relay = ProxyClient(self.daemon.relay_argv(self.workdir / "relay.toml"), log, self.args.timeout)
        return relay, [*servers, ServerProcess(relay.pid)]

    def run_server(
        self, path: str, server: str, round_no: int, wrap: Callable[[list[str]], list[str]] | None = None
    ) -> Run:
        """One GetBlob of ``server`` on ``path``; for ours on a cache path, with a new empty cache directory that is
        checked to hold the blob afterwards (the bench fails if not), then removed; on a relay path, the relay's log
        must not say it served the client itself. ``wrap`` changes the argv of a spawned server."""
        spec = PATHS[path]
        registry = self.registries[spec.tls]
        cache = self.workdir / f"cache-{path}-{round_no}" if spec.kind == CACHE and server == OURS else None
        if cache is not None:
            cache.mkdir()
        case = f"{path}, {server}"
        try:
            argv = server_argv(server, cache, self.args.before)
            client, servers = self._session(spec, case, round_no, wrap(argv) if wrap else argv)
            transfer = measure_session(
                case,
                round_no,
                client,
                servers,
                registry.authority,
                registry,
                self.layer,
                self.args.read_size_kib * 1024,
                self.args.hash,
                self.args.timeout,
            )
            if spec.kind == RELAY:
                log = transfer_log(self.workdir, case, round_no).read_text(errors="replace")
                if SERVED_HERE in log:
                    raise RuntimeError(f"{case} round {round_no}: the relay served its client itself:\n{log[-2000:]}")
            entry = ""
            if cache is not None:
                found = find_cached_blob(cache, self.layer)
                if found is None:
                    raise RuntimeError(
                        f"{path} round {round_no}: no file named after {self.layer.digest} of {self.layer.size:,} "
                        f"bytes in the cache directory {cache} after our server exited; it holds:\n"
                        f"{describe_tree(cache)}"
                    )
                entry = str(found.relative_to(cache))
        finally:
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
        if self.args.verbose:
            cached = f", cache entry {entry}" if entry else ""
            speed = f"{transfer.mb_s:.0f} MB/s{cached}"
            print(f"  {path} {server} (protocol {transfer.protocol}) round {round_no}: {speed}", flush=True)
        return Run(path, server, transfer, entry)

    def references(self, round_no: int) -> list[ReferenceRun]:
        """The reference commands of one round: over the layer file, and over each registry in use."""
        layer, size = self.layer, self.layer.size
        refs = [
            run_reference("`sha256sum` of the layer file", round_no, ["sha256sum", str(layer.path)], size),
            run_reference(
                "Python `hashlib.sha256` of the layer file, 1 MiB `readinto`",
                round_no,
                reference_argv(ref_hashlib, str(layer.path), layer.digest),
                size,
            ),
        ]
        for tls, registry in sorted(self.registries.items()):
            url = registry.blob_url(layer.digest)
            transport = "TLS" if tls else "plain HTTP"
            if curl := curl_argv(registry, layer):
                name = f"`curl -s{' -k --http1.1' if tls else ''} -o /dev/null` of the blob URL, {transport}"
                refs.append(run_reference(name, round_no, curl, size))
            loop = "a blocking `ssl.SSLSocket`" if tls else "a blocking socket"
            refs.append(
                run_reference(
                    f"Python read loop, {transport}: {loop}, `recv_into` 1 MiB",
                    round_no,
                    reference_argv(ref_http_read, url),
                    size,
                )
            )
            refs.append(
                run_reference(
                    f"Python read loop, {transport}, + `hashlib.sha256` inline",
                    round_no,
                    reference_argv(ref_http_read, url, "--hash"),
                    size,
                )
            )
        return refs

    def profile_ours(self, path: str) -> None:
        """One extra, unmeasured transfer of ours on ``path`` under ``py-spy record`` (collapsed stacks or a flame
        graph)."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = Path(self.args.py_spy_out).resolve()
        fmt = "flamegraph" if out.suffix == ".svg" else "raw"
        run = self.run_server(
            path,
            OURS,
            0,
            wrap=lambda argv: [py_spy, "record", "--rate", "250", "--format", fmt, "--output", str(out), "--", *argv],
        )
        print(f"py-spy: {path}, {run.transfer.mb_s:.0f} MB/s under the profiler, profile in {out}", flush=True)


def curl_argv(registry: RunningRegistry, layer: Layer) -> list[str] | None:
    curl = shutil.which("curl")
    if curl is None:
        return None
    tls = ["-k", "--http1.1"] if registry.tls else []  # the registry offers h2; ours and the Python loop speak 1.1
    return [curl, "-s", "-f", *tls, "-o", "/dev/null", registry.blob_url(layer.digest)]


def warm_up(registry: RunningRegistry, layer: Layer) -> None:
    """One read of the blob through the registry: its storage file into the page cache, and a check that the
    registry serves it (curl, or the Python read loop without curl)."""
    argv = curl_argv(registry, layer) or reference_argv(ref_http_read, registry.blob_url(layer.digest), "--hash")
    run_reference("warm-up", 0, argv, layer.size)


# ------------------------------------------------------------------------------------------- report


def _values(runs: list[Run], path: str, server: str, get: Callable[[BlobTransfer], float]) -> list[float]:
    return [get(r.transfer) for r in runs if r.path == path and r.server == server]


def _mb_s(r: BlobTransfer) -> float:
    return r.mb_s


def _cpu_s_gb(r: BlobTransfer) -> float:
    return r.per_gb(r.server_cpu)


def _hwm_mib(r: BlobTransfer) -> float:
    return r.server_hwm / MIB


def _cpu_total(r: BlobTransfer) -> float:
    return r.server_cpu_total


#: the server processes of a relay path, as in BlobTransfer.parts: who, what its CPU total spans
RELAY_PROCESSES = (("the daemon", "over the session"), ("the relay process", "whole process"))


def process_metrics(index: int) -> list[tuple[str, str, Callable[[BlobTransfer], float]]]:
    """The rows of one of a relay path's server processes (``RELAY_PROCESSES[index]``): label, format, value."""
    return [
        ("CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.parts[index].cpu)),
        (f"CPU, {RELAY_PROCESSES[index][1]}, s", ".2f", lambda r: r.parts[index].cpu_total),
        ("peak RSS (VmHWM), MiB", ".1f", lambda r: r.parts[index].hwm / MIB),
    ]


def render(
    runs: list[Run],
    refs: list[ReferenceRun],
    paths: list[str],
    layer: Layer,
    registries: dict[bool, RunningRegistry],
    tls_info: str,
    args: argparse.Namespace,
    machine: dict[str, str],
) -> str:
    hashing = (
        "on (`--hash`: SHA-256 of every byte, checked against the digest)"
        if args.hash
        else "off (the size is checked; FinishPipe's success says the server verified the digest)"
    )
    order = ", ".join(f"{r.path} {r.server}" for r in runs if r.transfer.round == 1)
    before = any(r.server == BEFORE for r in runs)
    lines = [
        BEGIN_MARK,
        "# GetBlob throughput: image-proxy vs skopeo experimental-image-proxy",
        "",
        *report_header(machine),
        f"- blob: {layer.size:,} bytes ({args.size_mib} MiB of random bytes in a tar, gzip level 0)",
        "- registries: docker-registry on 127.0.0.1, filesystem storage, the image pushed with `skopeo copy` to "
        "each (they share nothing), page cache warm: "
        + "; ".join(
            f"TLS on :{reg.port} (self-signed P-256 certificate from `openssl req -x509`; {tls_info} with Python's "
            "default client context, which ours and the Python references use; skopeo's Go client may pick "
            "another suite)"
            if tls
            else f"plain HTTP on :{reg.port}"
            for tls, reg in sorted(registries.items())
        ),
        f"- servers: {OURS} `python -m proxy experimental-image-proxy --tls-verify=false` (cache paths: "
        f"`--blob-cache DIR`), {SKOPEO} `skopeo experimental-image-proxy --tls-verify=false`"
        + (f", {BEFORE} the same command from {describe_before(args.before)}" if before else "")
        + (
            "; daemon and relay paths: one `python -m proxy daemon --listen SOCK --no-blob-cache --config FILE "
            "--tls-verify=false` (FILE empty) for the whole run, reached directly or through a spawned relay"
            if any(PATHS[name].through_daemon for name in paths)
            else ""
        ),
        f"- rounds: {args.rounds}, each in this order: {order}; client read size {args.read_size_kib} KiB; "
        f"client hashing {hashing}",
        "- paths:",
        *(f"  - `{name}`: {PATHS[name].what}" for name in paths),
        "- **the machine is shared and noisy**: treat differences under ~10-15 % as noise; the min to max ranges show "
        "the spread",
        "",
        "## Summary",
        "",
        "Medians over the rounds; ratio = ours / skopeo of the median throughputs (above 1: ours is faster).",
        "",
        "| path | skopeo MB/s | ours MB/s | ratio | ours server CPU s/GB | ours peak RSS MiB |"
        + (" before MB/s | before CPU s/GB | ours / before CPU |" if before else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if before else ""),
    ]
    for name in paths:
        spec = PATHS[name]
        ours = _values(runs, name, OURS, _mb_s)
        theirs = _values(runs, spec.skopeo_path, SKOPEO, _mb_s)
        label = f"{name} (skopeo: its {spec.base} run)" if spec.base else name
        row = (
            f"| {label} | {statistics.median(theirs):.0f} | {statistics.median(ours):.0f} "
            f"| {ratio_of_medians(ours, theirs)} | {statistics.median(_values(runs, name, OURS, _cpu_s_gb)):.2f} "
            f"| {statistics.median(_values(runs, name, OURS, _hwm_mib)):.1f} |"
        )
        if before:
            was = _values(runs, name, BEFORE, _mb_s)
            if was:
                cpu, was_cpu = _values(runs, name, OURS, _cpu_s_gb), _values(runs, name, BEFORE, _cpu_s_gb)
                row += (
                    f" {statistics.median(was):.0f} | {statistics.median(was_cpu):.2f} "
                    f"| {ratio_of_medians(cpu, was_cpu)} |"
                )
            else:
                row += " | | |"
        lines.append(row)
    for name in paths:
        spec = PATHS[name]
        if spec.kind != CACHE or spec.base is None:
            continue
        ours = _values(runs, name, OURS, _mb_s)
        to_base = ratio_of_medians(ours, _values(runs, spec.base, OURS, _mb_s))
        to_skopeo = ratio_of_medians(ours, _values(runs, spec.base, SKOPEO, _mb_s))
        targets = CACHE_TARGETS.get(name)
        lines += [
            "",
            f"`{name}` throughput: ours with an empty cache / ours `{spec.base}` without cache = "
            f"**{to_base}**{_verdict(to_base, targets[0] if targets else None)}; / skopeo `{spec.base}` = "
            f"**{to_skopeo}**{_verdict(to_skopeo, targets[1] if targets else None)}.",
        ]
    lines += _relay_cost(runs, paths)
    for name in paths:
        lines += ["", *_path_table(runs, name)]
    if refs:
        lines += [
            "",
            "## References",
            "",
            "Same blob, same rounds; each a separate process, its CPU from `wait4` (the Python ones include "
            "interpreter start-up, about 0.03 s).",
            "",
            "| reference | MB/s | CPU s/GB |",
            "|---|---:|---:|",
        ]
        for name in dict.fromkeys(r.name for r in refs):
            mine = [r for r in refs if r.name == name]
            cpu = [r.cpu_s_gb for r in mine]
            lines.append(f"| {name} | {median_range([r.mb_s for r in mine], '.0f')} | {median_range(cpu, '.2f')} |")
    lines += [
        "",
        "## Every round",
        "",
        "Relay paths: server CPU, whole-process CPU and peak RSS are the daemon's + the relay's (each in brackets).",
        "",
        "| round | path | server | MB/s | wall s | server CPU s | whole-process CPU s | peak RSS MiB | client CPU s "
        "| registry CPU s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        r = run.transfer
        cpu, hwm = f"{r.server_cpu:.2f}", f"{r.server_hwm / MIB:.1f}"
        total = f"{r.server_cpu_total:.2f}"
        if len(r.parts) > 1:
            cpu += f" ({' + '.join(f'{part.cpu:.2f}' for part in r.parts)})"
            total += f" ({' + '.join(f'{part.cpu_total:.2f}' for part in r.parts)})"
            hwm += f" ({' + '.join(f'{part.hwm / MIB:.1f}' for part in r.parts)})"
        lines.append(
            f"| {r.round} | {run.path} | {run.server} | {r.mb_s:.0f} | {r.wall:.2f} | {cpu} "
            f"| {total} | {hwm} | {r.client_cpu:.2f} | {r.registry_cpu:.2f} |"
        )
    entries = sorted({r.cache_entry for r in runs if r.cache_entry})
    if entries:
        lines += [
            "",
            f"Cache paths: after every round of ours the cache directory held the blob ({layer.size:,} bytes) as "
            + ", ".join(f"`DIR/{e}`" for e in entries)
            + "; the directory was removed after the round.",
        ]
    lines += ["", "Produced by `python bench/blob_throughput.py`; see bench/README.md.", END_MARK, ""]
    return "\n".join(lines)


def describe_before(tree: Path) -> str:
    """The earlier tree, and its commit when it is a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"`{tree}`"
    return f"`{tree}` (commit {commit[:90]})"


def _verdict(ratio: str, target: float | None) -> str:
    if target is None:
        return ""
    met = ratio != "n/a" and float(ratio) >= target
    return f" (target ≥ {target:g}: {'met' if met else '**not met**'})"


def _relay_cost(runs: list[Run], paths: list[str]) -> list[str]:
    """Per registry with a daemon or relay path: skopeo spawned, ours spawned, through the daemon and through a
    relay to it, side by side (medians), with the ratios that show what the relay costs."""
    transports = [spec for spec in PATHS.values() if spec.kind == SPAWNED and f"{spec.name}-daemon" in paths]
    if not transports:
        return []
    lines = [
        "",
        "## The relay's cost: ours spawned, through the daemon, through a relay to the daemon",
        "",
        "Medians over the same rounds; `relay` counts the daemon's CPU plus the relay's, and the daemon's peak RSS "
        "over the transfer plus the relay's whole-process one; the session's CPU is the spawned server's from exec "
        "(start-up, Initialize, OpenImage, the transfer), the daemon's from the connection (or the relay's spawn) "
        "on, plus the relay's from exec; ratios of medians (throughput: above 1 is faster; CPU and RSS: below 1 is "
        "cheaper).",
        "",
        "| registry | metric | skopeo spawned | ours spawned | ours daemon | ours relay → daemon | relay / daemon "
        "| relay / spawned | daemon / spawned | relay / skopeo |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec in transports:
        for label, fmt, get in (
            ("throughput, MB/s", ".0f", _mb_s),
            ("server CPU during transfer, s/GB", ".2f", _cpu_s_gb),
            ("server CPU over the session, s", ".2f", _cpu_total),
            ("server peak RSS, MiB", ".1f", _hwm_mib),
        ):
            skopeo, spawned, daemon, relay = (
                _values(runs, path, server, get)
                for path, server in (
                    (spec.name, SKOPEO),
                    (spec.name, OURS),
                    (f"{spec.name}-daemon", OURS),
                    (f"{spec.name}-relay", OURS),
                )
            )
            cells = [f"{statistics.median(v):{fmt}}" if v else "—" for v in (skopeo, spawned, daemon, relay)]
            ratios = [
                ratio_of_medians(a, b) if a and b else "—"
                for a, b in ((relay, daemon), (relay, spawned), (daemon, spawned), (relay, skopeo))
            ]
            lines.append(f"| `{spec.name}` | {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    for spec in transports:
        relayed = [r.transfer for r in runs if r.path == f"{spec.name}-relay"]
        if relayed:
            own = [
                f"{label}: {statistics.median(get(r) for r in relayed):{fmt}}" for label, fmt, get in process_metrics(1)
            ]
            lines += ["", f"`{spec.name}-relay`, the relay process alone (medians): {'; '.join(own)}."]
    return lines


def _path_table(runs: list[Run], name: str) -> list[str]:
    """The metrics of one path: ours, skopeo, their ratio, for the other kinds the ratio to ours spawned, and for a
    relay path the ratio to the direct daemon path and each process's share."""
    spec = PATHS[name]
    header = f"| metric | {OURS} | {SKOPEO} | ratio |"
    rule = "|---|---:|---:|---:|"
    before = any(r.server == BEFORE and r.path == name for r in runs)
    if before:
        header += f" {BEFORE} | ours / {BEFORE} |"
        rule += "---:|---:|"
    compared = [other for other in (spec.base, spec.daemon) if other]
    for other in compared:
        header += f" ours / ours `{other}` |"
        rule += "---:|"
    lines = [f"## `{name}`: {spec.what}", "", header, rule]
    for label, fmt, get in TRANSFER_METRICS:
        ours = _values(runs, name, OURS, get)
        theirs = _values(runs, spec.skopeo_path, SKOPEO, get)
        ratio = ratio_of_medians(ours, theirs)
        row = f"| {label} | {median_range(ours, fmt)} | {median_range(theirs, fmt)} | {ratio} |"
        if before:
            was = _values(runs, name, BEFORE, get)
            row += f" {median_range(was, fmt)} | {ratio_of_medians(ours, was)} |"
        row += "".join(f" {ratio_of_medians(ours, _values(runs, other, OURS, get))} |" for other in compared)
        lines.append(row)
    if spec.kind == RELAY:
        for index, (who, _) in enumerate(RELAY_PROCESSES):
            for label, fmt, get in process_metrics(index):
                ours = _values(runs, name, OURS, get)
                lines.append(
                    f"| of which {who}: {label} | {median_range(ours, fmt)} | — | — |" + " — |" * len(compared)
                )
    return lines


# ------------------------------------------------------------------------------------------- main


def _path_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="layer content size in MiB (default 1024)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds; each runs every path, ours then skopeo (default 3)"
    )
    parser.add_argument(
        "--paths",
        type=_path_list,
        default=list(PATHS),
        help=f"comma list of paths to measure (default all: {','.join(PATHS)}); a cache path also measures its "
        "uncached base (tls-cache: tls)",
    )
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="Markdown file whose section to write"
    )
    parser.add_argument("--read-size-kib", type=int, default=1024, help="client read size per read (default 1024)")
    parser.add_argument(
        "--hash", action="store_true", help="SHA-256 the bytes in the client too (costs client CPU the servers share)"
    )
    parser.add_argument(
        "--before",
        type=lambda text: Path(text).resolve(),
        help="a source tree of an earlier version (a git worktree): its server runs too, on the uncached paths",
    )
    parser.add_argument("--no-references", action="store_true", help="skip the reference commands")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on every reply and on the drain, s")
    parser.add_argument("--workdir", help="where to put the layout and registry storage (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--py-spy-out", help="after the rounds, profile one transfer of ours with py-spy into FILE")
    parser.add_argument(
        "--profile-path",
        choices=[name for name, spec in PATHS.items() if not spec.through_daemon],
        help="the path --py-spy-out profiles (a spawned or cache path; default: the first of --paths)",
    )
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress lines")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1 or args.read_size_kib < 1:
        parser.error("--size-mib, --rounds and --read-size-kib must be positive")
    if args.py_spy_out:
        args.profile_path = args.profile_path or args.paths[0]
        if PATHS[args.profile_path].through_daemon:
            parser.error(f"--profile-path {args.profile_path}: only a spawned server can be profiled")
        if args.profile_path not in measured_paths(args.paths):
            parser.error(f"--profile-path {args.profile_path} is not among the measured paths")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = start_bench(args.workdir, "blob-bench-", args.verbose)
    if bench is None:
        return 2
    if any(PATHS[name].tls for name in args.paths) and shutil.which("openssl") is None:
        print("openssl is required for the TLS paths (apt-get install openssl)", file=sys.stderr)
        return 2
    if args.before is not None and not (args.before / "proxy" / "__main__.py").is_file():
        print(f"--before {args.before}: not a source tree of image-proxy (no proxy/__main__.py)", file=sys.stderr)
        return 2
    machine, workdir, progress = bench.machine, bench.workdir, bench.progress
    paths = measured_paths(args.paths)
    try:
        started = time.perf_counter()
        layer, _ = build_layout(workdir / "layout", args.size_mib * MIB)
        progress(f"layout: {layer.size:,} bytes, {layer.digest} ({time.perf_counter() - started:.1f} s)")
        with contextlib.ExitStack() as stack:
            registries: dict[bool, RunningRegistry] = {}
            for tls in sorted({PATHS[name].tls for name in paths}):
                registry = stack.enter_context(docker_registry(workdir / ("registry-tls" if tls else "registry"), tls))
                started = time.perf_counter()
                push(workdir / "layout", registry, args.timeout)
                warm_up(registry, layer)
                progress(
                    f"pushed to {registry.scheme}://{registry.authority}/{REPOSITORY}:{TAG} and read back "
                    f"({time.perf_counter() - started:.1f} s)"
                )
                registries[tls] = registry
            tls_info = tls_parameters(registries[True]) if True in registries else ""
            daemon = None
            if any(PATHS[name].through_daemon for name in paths):
                daemon = stack.enter_context(image_proxy_daemon(workdir / "daemon", args.timeout, blob_cache=False))
                progress(f"daemon (pid {daemon.process.pid}) listening on {daemon.listen}")
            runner = Bench(registries, layer, workdir, args, daemon)
            # by registry (plain first), then by kind (KINDS); ours then skopeo on each spawned path
            order = sorted(paths, key=lambda name: (PATHS[name].tls, KINDS.index(PATHS[name].kind)))
            runs: list[Run] = []
            refs: list[ReferenceRun] = []
            for round_no in range(1, args.rounds + 1):
                for name in order:
                    runs.append(runner.run_server(name, OURS, round_no))
                    if PATHS[name].kind == SPAWNED:
                        runs.append(runner.run_server(name, SKOPEO, round_no))
                        if args.before is not None:
                            runs.append(runner.run_server(name, BEFORE, round_no))
                if not args.no_references:
                    refs += runner.references(round_no)
            if args.py_spy_out:
                runner.profile_ours(args.profile_path)
        report = render(runs, refs, paths, layer, registries, tls_info, args, machine)
        write_report(Path(args.out), report, BEGIN_MARK, END_MARK)
        print(report)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
