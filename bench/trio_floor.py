#!/usr/bin/env python3
"""The round-trip floor of a trio server in CPython, against skopeo's proxy and ours (issue 17).

A minimal server (``--minimal-server``, below: 40 lines) does only what one round trip of the bench in
``latency.py`` needs: read a packet, decode its JSON, for GetManifest make a pipe, write a fixed manifest and send
the reply with the fd; for FinishPipe close the write end and reply. No validation, no limits, no policy. The same
synchronous client (``bench/common.py``) drives skopeo's proxy, the minimal server and ours, alternating, and
reports round trips per second and each server's CPU per round trip (from /proc). It shows how much of the gap to
skopeo is the interpreter and the event loop, and how much is ours.

Run from the repository root: ``python bench/trio_floor.py [--rounds 5] [--round-trips 3000]``. It prints a
table; nothing is written. Needs skopeo; the OCI layout is made in a temporary directory.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ProxyClient, build_layout, proc_cpu

ACCEPT_ANYTHING = '{"default":[{"type":"insecureAcceptAnything"}]}'


def minimal_server() -> None:
    """Serve the client on stdin until EOF, as little as a round trip needs."""
    import trio

    manifest = b"x" * 600

    async def serve() -> None:
        sock = socket.socket(fileno=0)
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                return
            request = json.loads(data)
            method, fds = request["method"], []
            reply = {"success": True, "value": None, "pipeid": 0, "error_code": "", "error": ""}
            if method == "GetManifest":
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                os.write(write_end, manifest)
                reply.update(value="sha256:x", pipeid=write_end)
                fds = [read_end]
            elif method == "FinishPipe":
                os.close(request["args"][0])
            elif method == "OpenImage":
                reply["value"] = 1
            else:
                reply["value"] = "0.2.8"
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sock.sendmsg([json.dumps(reply).encode()], ancillary)
            for fd in fds:
                os.close(fd)
            await trio.lowlevel.checkpoint()

    trio.run(serve)


def rate(argv: list[str], reference: str, count: int, log: Path) -> tuple[float, float]:
    """Round trips per second, and the server's CPU per round trip in µs."""
    client = ProxyClient(argv, log, 60)
    try:
        client.call("Initialize")
        image = client.call("OpenImage", reference).value
        cpu0 = proc_cpu(client.pid)
        start = time.perf_counter()
        for _ in range(count):
            got = client.call("GetManifest", image)
            client.call("FinishPipe", got.pipeid)
            while os.read(got.fds[0], 65536):
                pass
            os.close(got.fds[0])
        elapsed = time.perf_counter() - start
        cpu = proc_cpu(client.pid) - cpu0
    finally:
        client.close()
    return count / elapsed, cpu / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--minimal-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minimal_server:
        minimal_server()
        return 0
    if shutil.which("skopeo") is None:
        print("trio_floor.py: skopeo is needed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="trio-floor-"))
    try:
        layout = work / "layout"
        build_layout(layout, 1 << 16)
        policy = work / "policy.json"
        policy.write_text(ACCEPT_ANYTHING)
        oci = f"oci:{layout}:latest"
        servers = {
            "skopeo": (["skopeo", "--policy", str(policy), "experimental-image-proxy"], oci),
            "minimal trio server": ([sys.executable, __file__, "--minimal-server"], "any"),
            "ours": ([sys.executable, "-m", "proxy", "experimental-image-proxy", "--policy", str(policy)], oci),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (argv, reference) in servers.items():
                results[name].append(rate(argv, reference, args.round_trips, work / "server.log"))
        skopeo = statistics.median(r for r, _ in results["skopeo"])
        print("| server | round trips/s (median) | ratio to skopeo | server CPU per round trip, µs (median) |")
        print("|---|---:|---:|---:|")
        for name, runs in results.items():
            median = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"| {name} | {median:.0f} | {median / skopeo:.2f} | {cpu:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
