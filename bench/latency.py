#!/usr/bin/env python3
"""Latency of small operations: our proxy against skopeo's. Start-up (spawn to the Initialize reply, and to the
OpenImage reply of a local ``oci:`` image), sequential GetManifest round trips on one connection to a registry on
loopback, the wall time of the ``inspect docker://...`` command line, and of ``copy`` (``--copy-layers`` layers of
``--copy-layer-mb`` MB and one layer of ``--copy-big-mb`` MB from the registry into a new ``oci:`` layout, and the
big one from its ``oci:`` layout into a new one).

Set-up: an OCI layout holding one small image (``--layers`` layers of ``--layer-kib`` KiB of random bytes each, a
tar in gzip level 0), pushed with ``skopeo copy`` to a plain-HTTP docker-registry on 127.0.0.1. The same layout is
the ``oci:`` image of the start-up measurement. A policy file accepting anything is written into the work
directory and passed to every command (``--policy FILE``), so nothing depends on /etc/containers/policy.json.

Each round runs every measurement with fresh processes, ours then skopeo's (alternating, so slow drifts of a shared
machine hit both alike); one unmeasured warm-up run of each comes first. Servers are spawned with a
``SOCK_SEQPACKET`` socketpair on their stdin and driven by the small synchronous client of ``bench/common.py``.
See bench/README.md for what each number means.

Run from the repository root: ``python bench/latency.py [--rounds 5] [--round-trips 200] [--out FILE]``.
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    REPO_ROOT,
    REPOSITORY,
    TAG,
    Layer,
    ProtocolError,
    ProxyClient,
    RunningRegistry,
    SocketClient,
    build_layers_layout,
    docker_registry,
    image_proxy_daemon,
    median_range,
    push,
    ratio_of_medians,
    report_header,
    start_bench,
    write_report,
)

OURS = "ours"
SKOPEO = "skopeo"
SERVERS = (OURS, SKOPEO)

BEGIN_MARK = "<!-- latency.py: begin -->"
END_MARK = "<!-- latency.py: end -->"

#: a containers-policy.json that accepts every image
ACCEPT_ANYTHING = {"default": [{"type": "insecureAcceptAnything"}]}
#: what the import-time row imports (``proxy/__main__.py`` calls ``main()`` at import, so it is not imported itself)
IMPORTED_MODULE = "proxy.cli.main"


def server_argv(server: str, policy: Path) -> list[str]:
    if server == OURS:
        argv = [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]
        return [*argv, "--policy", str(policy)]
    return ["skopeo", "--policy", str(policy), "experimental-image-proxy", "--tls-verify=false"]


def copy_argv(server: str, policy: Path, reference: str, destination: str) -> list[str]:
    if server == OURS:
        argv = [sys.executable, "-m", "proxy", "copy", "-q", "--tls-verify=false", "--policy", str(policy)]
        return [*argv, reference, destination]
    return ["skopeo", "--policy", str(policy), "copy", "-q", "--src-tls-verify=false", reference, destination]


def inspect_argv(server: str, policy: Path, reference: str) -> list[str]:
    if server == OURS:
        return [sys.executable, "-m", "proxy", "inspect", "--tls-verify=false", "--policy", str(policy), reference]
    return ["skopeo", "--policy", str(policy), "inspect", "--tls-verify=false", reference]


# ------------------------------------------------------------------------------------------- measurements


@dataclass
class Run:
    """The measurements of one server in one round (round 0: the warm-up); None where not measured."""

    server: str
    round: int
    protocol: str = ""  # the version Initialize returned
    initialize_ms: float | None = None  # Popen -> Initialize reply
    open_oci_ms: float | None = None  # Popen -> OpenImage reply (oci: layout), same process
    round_trips_s: float | None = None  # GetManifest + FinishPipe + pipe read, per second
    round_trips_ids_s: float | None = None  # ours only: the same, every call with a request id
    round_trips_daemon_s: float | None = None  # ours only: the same, in order, on a connection to a daemon
    round_trips_relay_s: float | None = None  # ours only: the same, through a spawned relay to that daemon
    relay_initialize_ms: float | None = None  # ours only: spawn of a relay to that daemon -> Initialize reply
    relay_open_oci_ms: float | None = None  # ours only: the same relay -> OpenImage reply (oci: layout)
    inspect_s: float | None = None  # inspect docker://... wall time
    copy_layers_s: float | None = None  # copy docker://... (the --copy-layers image) oci:NEW
    copy_big_s: float | None = None  # copy docker://... (the one-layer --copy-big-mb image) oci:NEW
    copy_oci_s: float | None = None  # copy oci:... (the same big image) oci:NEW
    import_ms: float | None = None  # ours only: cumulative import time of IMPORTED_MODULE
    python_start_ms: float | None = None  # ours only: `python -c pass` wall time


def read_to_eof(fd: int) -> bytes:
    """Everything a pipe fd carries, then close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


class Bench:
    """The image, the registry and the options of one run: runs the measurements of one server."""

    def __init__(
        self,
        registry: RunningRegistry,
        layout: Path,
        manifest_digest: str,
        policy: Path,
        workdir: Path,
        args: argparse.Namespace,
    ) -> None:
        self.registry = registry
        self.oci_reference = f"oci:{layout}:{TAG}"
        self.docker_reference = f"docker://{registry.authority}/{REPOSITORY}:{TAG}"
        self.manifest_digest = manifest_digest
        self.policy = policy
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.args = args
        #: Run field -> (reference, its source layout) of each copy measurement; None: no copies measured
        self.copy_sources: dict[str, tuple[str, Path]] | None = None

    def _client(self, what: str, server: str, round_no: int) -> ProxyClient:
        return ProxyClient(
            server_argv(server, self.policy), self.logs / f"{what}-{server}-{round_no}.log", self.args.timeout
        )

    def start_up(self, run: Run) -> None:
        """One fresh server: Initialize, then OpenImage of the oci: image; both times from just before Popen."""
        start = time.perf_counter()
        client = self._client("startup", run.server, run.round)
        try:
            version = client.call("Initialize").value
            initialized = time.perf_counter()
            opened = client.call("OpenImage", self.oci_reference)
            done = time.perf_counter()
            if not isinstance(opened.value, int) or opened.value <= 0:
                raise ProtocolError(f"OpenImage {self.oci_reference} returned {opened.value!r}, not an image id")
            close_fds(opened.fds)
        except BaseException:
            print(f"start-up, {run.server} round {run.round} failed; log tail:\n{client.log_tail()}", file=sys.stderr)
            raise
        finally:
            client.close()
        run.protocol = str(version)
        run.initialize_ms = (initialized - start) * 1000
        run.open_oci_ms = (done - start) * 1000

    def round_trips(self, run: Run) -> None:
        """One fresh server: Initialize and OpenImage of the registry's image (not timed), then ``--round-trips``
        times GetManifest, FinishPipe, the pipe read to EOF (the manifest is far smaller than a pipe's buffer, so
        the server can finish writing it before anything reads it). Every manifest is checked against the digest
        in its reply and the pushed manifest's. Ours also: the same with request ids on every call, and through
        a daemon (a connection to ``image-proxy daemon``, in-order calls)."""
        client = self._client("round-trips", run.server, run.round)
        run.round_trips_s = self._round_trip_rate(client, run, "round trips")
        if run.server != OURS:
            return
        client = self._client("round-trips-ids", run.server, run.round)
        client.next_id = 1
        run.round_trips_ids_s = self._round_trip_rate(client, run, "round trips with ids")
        with image_proxy_daemon(
            self.workdir / f"daemon-{run.round}",
            self.args.timeout,
            ["--policy", str(self.policy)],
            # the daemon's per-connection rate limit (500 requests/s, bursts of 1000) is what a round-trip loop
            # measures otherwise
            config_text="[limits]\nrequests-per-second = 0\n",
        ) as daemon:
            client = SocketClient.connect(daemon.listen, self.args.timeout, daemon.log)
            run.round_trips_daemon_s = self._round_trip_rate(client, run, "round trips through the daemon")
            relay = daemon.relay_argv(self.workdir / f"relay-{run.round}.toml")
            client = ProxyClient(relay, self.logs / f"round-trips-relay-{run.round}.log", self.args.timeout)
            run.round_trips_relay_s = self._round_trip_rate(client, run, "round trips through a relay")
            start = time.perf_counter()
            client = ProxyClient(relay, self.logs / f"startup-relay-{run.round}.log", self.args.timeout)
            try:
                client.call("Initialize")
                run.relay_initialize_ms = (time.perf_counter() - start) * 1000
                opened = client.call("OpenImage", self.oci_reference)
                run.relay_open_oci_ms = (time.perf_counter() - start) * 1000
                close_fds(opened.fds)
            finally:
                client.close()

    def _round_trip_rate(self, client: SocketClient, run: Run, what: str) -> float:
        try:
            client.call("Initialize")
            image = client.call("OpenImage", self.docker_reference).value
            count = self.args.round_trips
            start = time.perf_counter()
            for _ in range(count):
                got = client.call("GetManifest", image)
                if len(got.fds) != 1:
                    close_fds(got.fds)
                    raise ProtocolError(f"GetManifest sent {len(got.fds)} fds, expected 1")
                try:
                    client.call("FinishPipe", got.pipeid)
                finally:
                    data = read_to_eof(got.fds[0])
                digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
                if digest != got.value or digest != self.manifest_digest:
                    raise ProtocolError(
                        f"GetManifest: {len(data)} bytes hashing to {digest}; the reply said {got.value!r}, the "
                        f"pushed manifest is {self.manifest_digest}"
                    )
            elapsed = time.perf_counter() - start
        except BaseException:
            print(f"{what}, {run.server} round {run.round} failed; log tail:\n{client.log_tail()}", file=sys.stderr)
            raise
        finally:
            client.close()
        return count / elapsed

    def inspect(self, run: Run) -> None:
        """``inspect docker://...`` as a fresh process, to its exit; its output must name the manifest digest."""
        argv = inspect_argv(run.server, self.policy, self.docker_reference)
        start = time.perf_counter()
        result = subprocess.run(
            argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=self.args.timeout, check=False
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n{result.stderr.strip()[-2000:]}")
        if self.manifest_digest not in result.stdout:
            raise RuntimeError(
                f"{' '.join(argv)}: the output does not name the manifest digest {self.manifest_digest}:\n"
                f"{result.stdout[:2000]}"
            )
        run.inspect_s = wall

    def copies(self, run: Run) -> None:
        """``copy`` as a fresh process, to its exit, into a new ``oci:`` layout each time (removed after); the
        layout's blobs are checked against the source's names (file name = digest, size) before it is removed."""
        if self.copy_sources is None:
            return
        for field, (reference, source_layout) in self.copy_sources.items():
            destination = self.workdir / f"copy-{run.server}-{run.round}"
            argv = copy_argv(run.server, self.policy, reference, f"oci:{destination}:{TAG}")
            start = time.perf_counter()
            result = subprocess.run(
                argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=self.args.timeout, check=False
            )
            wall = time.perf_counter() - start
            try:
                if result.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n{result.stderr[-2000:]}")
                check_copied_layers(source_layout, destination)
            finally:
                shutil.rmtree(destination, ignore_errors=True)
            setattr(run, field, wall)

    def python_info(self, run: Run) -> None:
        """Ours only: the bare interpreter's start-up, and the cumulative import time of our CLI."""
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], cwd=REPO_ROOT, timeout=self.args.timeout, check=True)
        run.python_start_ms = (time.perf_counter() - start) * 1000
        run.import_ms = import_time_ms(self.args.timeout)


def check_copied_layers(source: Path, destination: Path) -> None:
    """Every layer blob of the source layout is in the destination under the same name with the same size (the
    proxies verified the digests; this checks that the copy wrote the blobs the bench pushed)."""
    blobs = source / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_of(source).split(":", 1)[1]).read_bytes())
    for layer in manifest["layers"]:
        name = layer["digest"].split(":", 1)[1]
        copied = destination / "blobs" / "sha256" / name
        if not copied.is_file() or copied.stat().st_size != layer["size"]:
            raise RuntimeError(f"copy into {destination}: layer {layer['digest']} missing or of the wrong size")


def import_time_ms(timeout: float) -> float:
    """``python -X importtime -c "import IMPORTED_MODULE"``: the cumulative time of the top-level imports of our
    packages (``proxy``, ``protocol``), in ms."""
    argv = [sys.executable, "-X", "importtime", "-c", f"import {IMPORTED_MODULE}"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n{result.stderr.strip()[-2000:]}")
    total_us = 0
    line_re = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")  # an unindented name: a top-level import
    for line in result.stderr.splitlines():
        if (match := line_re.match(line)) and match.group(2).split(".")[0] in ("proxy", "protocol"):
            total_us += int(match.group(1))
    if not total_us:
        raise RuntimeError(f"{' '.join(argv)}: no import time line for our packages in its stderr")
    return total_us / 1000


# ------------------------------------------------------------------------------------------- report

#: the compared rows: label, format, value
METRICS: list[tuple[str, str, Callable[[Run], float | None]]] = [
    ("spawn → Initialize reply, ms", ".1f", lambda r: r.initialize_ms),
    ("spawn → OpenImage reply (`oci:` layout), ms", ".1f", lambda r: r.open_oci_ms),
    (
        "the same, ours spawned as a relay to a running daemon (skopeo: spawned), ms",
        ".1f",
        lambda r: r.relay_open_oci_ms if r.server == OURS else r.open_oci_ms,
    ),
    ("GetManifest round trips per second (higher is better)", ".0f", lambda r: r.round_trips_s),
    (
        "the same, ours with request ids (skopeo: in order, it has no ids)",
        ".0f",
        lambda r: r.round_trips_ids_s if r.server == OURS else r.round_trips_s,
    ),
    (
        "the same, ours through a daemon (skopeo: spawned)",
        ".0f",
        lambda r: r.round_trips_daemon_s if r.server == OURS else r.round_trips_s,
    ),
    (
        "the same, ours spawned as a relay to that daemon (skopeo: spawned)",
        ".0f",
        lambda r: r.round_trips_relay_s if r.server == OURS else r.round_trips_s,
    ),
    ("`inspect docker://…` wall time, s", ".3f", lambda r: r.inspect_s),
    ("`copy docker://… oci:…`, layers image (see above), s", ".3f", lambda r: r.copy_layers_s),
    ("`copy docker://… oci:…`, one big layer, s", ".3f", lambda r: r.copy_big_s),
    ("`copy oci:… oci:…`, one big layer, s", ".3f", lambda r: r.copy_oci_s),
]
#: ours-only rows: label, format, value
INFO_METRICS: list[tuple[str, str, Callable[[Run], float | None]]] = [
    ("`python -c pass` wall time (interpreter start-up), ms", ".1f", lambda r: r.python_start_ms),
    (f"`python -X importtime -c 'import {IMPORTED_MODULE}'`, cumulative, ms", ".1f", lambda r: r.import_ms),
]


def _values(runs: list[Run], server: str, get: Callable[[Run], float | None]) -> list[float]:
    return [v for r in runs if r.server == server and (v := get(r)) is not None]


def _fmt(value: float | None, fmt: str) -> str:
    return "—" if value is None else f"{value:{fmt}}"


def render(
    runs: list[Run],
    layers: list[Layer],
    manifest_digest: str,
    registry: RunningRegistry,
    args: argparse.Namespace,
    machine: dict[str, str],
) -> str:
    protocols = {server: sorted({r.protocol for r in runs if r.server == server}) for server in SERVERS}
    lines = [
        BEGIN_MARK,
        "# Latency: image-proxy vs skopeo experimental-image-proxy",
        "",
        *report_header(machine),
        f"- image: {len(layers)} layers of {args.layer_kib} KiB of random bytes (tar, gzip level 0; "
        f"{sum(layer.size for layer in layers):,} bytes of blobs), manifest {manifest_digest}; the same OCI layout "
        f"is the `oci:` image, and it was pushed with `skopeo copy` to a plain-HTTP docker-registry on "
        f":{registry.port} (`docker://{registry.authority}/{REPOSITORY}:{TAG}`)",
        f"- servers: {OURS} `python -m proxy experimental-image-proxy --tls-verify=false --policy FILE` (protocol "
        f"{', '.join(protocols[OURS])}), {SKOPEO} `skopeo --policy FILE experimental-image-proxy --tls-verify=false` "
        f"(protocol {', '.join(protocols[SKOPEO])}); FILE accepts anything (`insecureAcceptAnything`)",
        f"- inspect: {OURS} `python -m proxy inspect --tls-verify=false --policy FILE REF`, {SKOPEO} "
        "`skopeo --policy FILE inspect --tls-verify=false REF`; ours serves its proxy in the same process and talks "
        "to it through the client bindings over a socketpair, skopeo is one process and also lists the repository's "
        "tags",
        *(
            [
                f"- copy: {OURS} `python -m proxy copy -q --tls-verify=false --policy FILE REF oci:NEW:latest` (its "
                f"proxy served in the same process), {SKOPEO} `skopeo --policy FILE copy -q --src-tls-verify=false REF "
                f"oci:NEW:latest`; images: {args.copy_layers} layers of {args.copy_layer_mb} MB, and one layer of "
                f"{args.copy_big_mb} MB (random bytes, tar, gzip level 0), pushed to the same registry; the big one "
                "is also copied from its `oci:` layout; every copy into a new directory, removed after"
            ]
            if not args.no_copy
            else []
        ),
        f"- rounds: {args.rounds} after one unmeasured warm-up, each with fresh processes, ours then skopeo for each "
        "measurement: start-up (one process: the Initialize and OpenImage times both from Popen), round trips (one "
        f"process: {args.round_trips} times GetManifest + FinishPipe + pipe read to EOF after an untimed "
        "Initialize and OpenImage of the registry's image), inspect",
        "- **the machine is shared and noisy**: treat differences under ~10-15 % as noise; the min to max ranges show "
        "the spread",
        "",
        "## Summary",
        "",
        "Median (min to max) over the rounds; ratio = ours / skopeo of the medians (times: below 1 ours is faster; "
        "round trips per second: above 1 ours is faster).",
        "",
        f"| metric | {SKOPEO} | {OURS} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, fmt, get in METRICS:
        ours, theirs = _values(runs, OURS, get), _values(runs, SKOPEO, get)
        if not ours or not theirs:
            continue  # not measured in this run (--no-copy)
        lines.append(
            f"| {label} | {median_range(theirs, fmt)} | {median_range(ours, fmt)} | {ratio_of_medians(ours, theirs)} |"
        )
    for label, fmt, get in INFO_METRICS:
        ours = _values(runs, OURS, get)
        if ours:
            lines.append(f"| {label} (info, ours only) | — | {median_range(ours, fmt)} | — |")
    lines += [
        "",
        "## Every round",
        "",
        "| round | server | Initialize ms | OpenImage `oci:` ms | round trips/s | with ids | via daemon | via relay "
        "| inspect s "
        "| copy layers s | copy big s | copy oci s | `python -c pass` ms | import ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.round} | {r.server} | {_fmt(r.initialize_ms, '.1f')} | {_fmt(r.open_oci_ms, '.1f')} "
            f"| {_fmt(r.round_trips_s, '.0f')} | {_fmt(r.round_trips_ids_s, '.0f')} "
            f"| {_fmt(r.round_trips_daemon_s, '.0f')} | {_fmt(r.round_trips_relay_s, '.0f')} "
            f"| {_fmt(r.inspect_s, '.3f')} | {_fmt(r.copy_layers_s, '.3f')} "
            f"| {_fmt(r.copy_big_s, '.3f')} | {_fmt(r.copy_oci_s, '.3f')} | {_fmt(r.python_start_ms, '.1f')} "
            f"| {_fmt(r.import_ms, '.1f')} |"
        )
    lines += ["", "Produced by `python bench/latency.py`; see bench/README.md.", END_MARK, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each ours then skopeo (default 5)")
    parser.add_argument(
        "--round-trips", type=int, default=1000, help="GetManifest round trips per connection (default 1000)"
    )
    parser.add_argument("--layers", type=int, default=3, help="layers of the image (default 3)")
    parser.add_argument("--layer-kib", type=int, default=1024, help="each layer's content in KiB (default 1024)")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="Markdown file whose section to write"
    )
    parser.add_argument("--copy-layers", type=int, default=4, help="layers of the copy image (default 4)")
    parser.add_argument("--copy-layer-mb", type=int, default=50, help="each of its layers in MB (default 50)")
    parser.add_argument("--copy-big-mb", type=int, default=200, help="the one-layer copy image in MB (default 200)")
    parser.add_argument("--no-copy", action="store_true", help="skip the copy measurements")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound on every reply and command, s")
    parser.add_argument("--no-info", action="store_true", help="skip ours' interpreter start-up and import rows")
    parser.add_argument("--workdir", help="where to put the layout and registry storage (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress lines")
    args = parser.parse_args(argv)
    if min(args.rounds, args.round_trips, args.layers, args.layer_kib) < 1:
        parser.error("--rounds, --round-trips, --layers and --layer-kib must be positive")
    return args


def manifest_of(layout: Path) -> str:
    """The digest of the layout's (only) manifest, from its index.json."""
    index = json.loads((layout / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = start_bench(args.workdir, "latency-bench-", args.verbose)
    if bench is None:
        return 2
    machine, workdir, progress = bench.machine, bench.workdir, bench.progress
    try:
        layout = workdir / "layout"
        layers = build_layers_layout(layout, [args.layer_kib * 1024] * args.layers, "bench/latency.py")
        manifest_digest = manifest_of(layout)
        policy = workdir / "policy.json"
        policy.write_text(json.dumps(ACCEPT_ANYTHING))
        with docker_registry(workdir / "registry") as registry:
            push(layout, registry, args.timeout)
            progress(f"image {manifest_digest} ({len(layers)} layers) pushed to {registry.authority}")
            runner = Bench(registry, layout, manifest_digest, policy, workdir, args)
            if not args.no_copy:
                runner.copy_sources = {}
                for field, name, sizes in (
                    ("copy_layers_s", "copy-layers", [args.copy_layer_mb * 1000 * 1000] * args.copy_layers),
                    ("copy_big_s", "copy-big", [args.copy_big_mb * 1000 * 1000]),
                ):
                    source = workdir / name
                    build_layers_layout(source, sizes, "bench/latency.py")
                    push(source, registry, args.timeout, repository=f"bench/{name}")
                    runner.copy_sources[field] = (f"docker://{registry.authority}/bench/{name}:{TAG}", source)
                runner.copy_sources["copy_oci_s"] = (f"oci:{workdir / 'copy-big'}:{TAG}", workdir / "copy-big")
                progress("copy images built and pushed")
            runs: list[Run] = []
            for round_no in range(args.rounds + 1):  # round 0: the warm-up, not reported
                measured = [Run(server, round_no) for server in SERVERS]
                for measure in (runner.start_up, runner.round_trips, runner.inspect, runner.copies):
                    for run in measured:
                        measure(run)
                if not args.no_info:
                    runner.python_info(measured[0])
                if round_no:
                    runs += measured
                for r in measured:
                    progress(
                        f"  {'warm-up' if not round_no else f'round {round_no}'} {r.server}: Initialize "
                        f"{_fmt(r.initialize_ms, '.1f')} ms, OpenImage oci {_fmt(r.open_oci_ms, '.1f')} ms, "
                        f"{_fmt(r.round_trips_s, '.0f')} round trips/s, inspect {_fmt(r.inspect_s, '.3f')} s, copy "
                        f"{_fmt(r.copy_layers_s, '.3f')} / {_fmt(r.copy_big_s, '.3f')} / {_fmt(r.copy_oci_s, '.3f')} s"
                    )
        report = render(runs, layers, manifest_digest, registry, args, machine)
        write_report(Path(args.out), report, BEGIN_MARK, END_MARK)
        print(report)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
