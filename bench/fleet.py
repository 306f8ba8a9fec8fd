#!/usr/bin/env python3
"""A fleet pulling one image at once (issue 20): N nodes (``--nodes 1,4,8``), each a network namespace running
``image-proxy daemon``, through a pull-through cache host and straight from the upstream registry.

The hosts and what runs on them are those of the fleet tests (tests/fleet/netns.py, tests/fleet/hosts.py): an
upstream docker-registry holding one image (``--layers`` layers of ``--layer-mib`` MiB of incompressible bytes,
stored as gzip level 0, pushed by skopeo), a cache host (pull-through docker-registry behind nginx: TLS toward the
nodes with a test CA, an egress cache that fetches each blob from the upstream once), and one daemon per node with
its own registries.conf (mirror: the cache host, or none for ``direct``) and an empty blob cache. Every round starts
a new empty cache host and new daemons; the daemons are started (and ready) before the clock.

All nodes pull at once with the client bindings (``protocol.client.pull``: manifest, config, layers, 4 at a time,
each blob's size and digest checked); the wall time runs until the last node has verified its last blob. Reported
per mode and N (median over ``--rounds``): wall time; bytes the upstream served (blob GETs in its access log, all
clients); bytes each node received over the network; each daemon's CPU seconds (utime + stime after the pull) and
peak RSS (VmHWM), the largest over the nodes.

Needs root (namespaces), iproute2, docker-registry, nginx and skopeo (``./setup.sh --test``), and the project
importable (run it with ``.venv/bin/python``). Writes its section between ``<!-- fleet.py: begin -->`` and
``<!-- fleet.py: end -->`` of ``--out`` (default bench/RESULTS.md) and prints it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import trio  # noqa: E402
import trustme  # noqa: E402
from common import machine_info, proc_cpu, proc_hwm_bytes, report_header, write_report  # noqa: E402

from tests.fleet.clients import failures, pull_everywhere  # noqa: E402
from tests.fleet.hosts import build_image, nodes_running, registries_conf, start_cache, start_upstream  # noqa: E402
from tests.fleet.netns import network  # noqa: E402

BEGIN, END = "<!-- fleet.py: begin -->", "<!-- fleet.py: end -->"
MODES = ("cache", "direct")


def one_round(net, ca, upstream, image, mode: str, count: int, workdir: Path) -> dict[str, float]:
    hosts = [net[f"node-{i}"] for i in range(count)]
    cache = start_cache(net["cache"], workdir / "cache", upstream, ca) if mode == "cache" else None
    try:
        mirrors = [(cache.authority, False)] if cache else []
        conf = registries_conf(upstream.authority, mirrors)
        tls = [cache.authority] if cache else []
        with nodes_running(hosts, workdir / "nodes", conf, ca, tls) as nodes:
            mark = upstream.access.mark()
            front_mark = cache.front.mark() if cache else 0
            cpu_before = {n.process.pid: proc_cpu(n.process.pid) for n in nodes}
            started = time.monotonic()
            states = trio.run(pull_everywhere, nodes, upstream.reference())
            wall = time.monotonic() - started
            if failures(states):
                raise RuntimeError(f"{mode} N={count}: a pull failed:\n{failures(states)}")
            for state in states:
                if state.image is None or state.image.manifest_digest != image.manifest_digest:
                    raise RuntimeError(f"{mode} N={count}: {state.node.host.role} pulled something else")
            cpu = max(proc_cpu(n.process.pid) - cpu_before[n.process.pid] for n in nodes)
            rss = max(proc_hwm_bytes(n.process.pid) for n in nodes)
            upstream_gets = upstream.access.blob_gets(mark)
            served_to_nodes = upstream_gets + (cache.front.blob_gets(front_mark) if cache else [])
            addresses = {n.address for n in nodes}
            per_node = [sum(e.bytes for e in served_to_nodes if e.client == a) for a in addresses]
            return {
                "wall": wall,
                "upstream": sum(e.bytes for e in upstream_gets),
                "per_node": statistics.median(per_node),
                "cpu": cpu,
                "rss": rss,
            }
    finally:
        if cache is not None:
            cache.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,4,8")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir=args.workdir))
    try:
        image = build_image(workdir / "layout", [args.layer_mib << 20] * args.layers)
        image_bytes = image.config_size + sum(layer.size for layer in image.layers)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        with network(["upstream", "cache", *(f"node-{i}" for i in range(max(counts)))]) as net:
            ca = trustme.CA()
            upstream = start_upstream(net["upstream"], workdir / "upstream", image, "fleet")
            try:
                for r in range(args.rounds):
                    for count in counts:
                        for mode in MODES:  # alternating, so that drifts of a shared machine hit both alike
                            where = workdir / f"r{r}-{mode}-{count}"
                            result = one_round(net, ca, upstream, image, mode, count, where)
                            results.setdefault((mode, count), []).append(result)
                            print(f"round {r + 1} {mode} N={count}: {result}", file=sys.stderr, flush=True)
                            shutil.rmtree(where, ignore_errors=True)
            finally:
                upstream.process.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    mib = 1 << 20
    lines = [
        BEGIN,
        "## A fleet pulling one image at once: through a pull-through cache host and straight from the upstream "
        "(`bench/fleet.py`)",
        "",
        *report_header(machine_info()),
        f"- image: {args.layers} layers of {args.layer_mib} MiB (incompressible, gzip level 0) + config = "
        f"{image_bytes / mib:.1f} MiB; {args.rounds} rounds, medians; every node a network namespace with its own "
        "`image-proxy daemon` (empty blob cache), all pulling at once with the client bindings (4 blobs at a time, "
        "every blob verified)",
        "- `cache`: the nodes' registries.conf names the cache host as the mirror (docker-registry 2.8 in "
        "pull-through mode behind nginx: TLS to the nodes, an egress cache fetching each blob upstream once); "
        "`direct`: no mirror, every node pulls from the upstream",
        "- upstream bytes: blob bodies in the upstream's access log; per node: blob bytes the node received (cache "
        "front and upstream logs); CPU and RSS: the busiest daemon (utime + stime during the pull, VmHWM)",
        "",
        "| mode | N | wall s | upstream MiB | upstream / image | MiB per node | daemon CPU s | daemon peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for count in counts:
        for mode in MODES:
            rounds = results[(mode, count)]

            def med(key: str, rounds=rounds) -> float:
                return statistics.median(r[key] for r in rounds)

            lines.append(
                f"| {mode} | {count} | {med('wall'):.2f} | {med('upstream') / mib:.1f} | "
                f"{med('upstream') / image_bytes:.2f} | {med('per_node') / mib:.1f} | {med('cpu'):.2f} | "
                f"{med('rss') / mib:.0f} |"
            )
    lines += ["", END, ""]
    report = "\n".join(lines)
    write_report(args.out, report, BEGIN, END)
    print(report)


if __name__ == "__main__":
    main()
