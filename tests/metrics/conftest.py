"""Fixtures for the metrics tests: a real Prometheus server (Debian ``prometheus``) on loopback, scraping a daemon's
``--metrics-listen`` every second, queried through its HTTP API; the daemon and fault-proxy fixtures of tests/daemon
and tests/faults."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.daemon.conftest import socket_dir, start_daemon  # noqa: F401  (fixtures used by the metrics tests)
from tests.faults.conftest import fault, fault_images  # noqa: F401

PROMETHEUS_HINT = (
    "the metrics tests need a Prometheus server: install Debian's prometheus (./setup.sh --test does), "
    "or put a prometheus executable on PATH"
)
#: how long Prometheus may take to start, and one HTTP exchange with it
START_DEADLINE = 60.0
HTTP_DEADLINE = 10.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the daemon is then told to listen there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_DEADLINE) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Prometheus:
    """A Prometheus server scraping ``target`` (HOST:PORT) every second; ``query`` asks its HTTP API."""

    def __init__(self, process: trio.Process, port: int, target: str, log: Path) -> None:
        self.process = process
        self.port = port
        self.target = target
        self.log = log

    async def get(self, path: str) -> tuple[int, bytes]:
        return await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{self.port}{path}")

    async def query(self, expression: str) -> list[dict]:
        """An instant query's result: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        status, body = await self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (expression, status, body[:500])
        return answer["data"]["result"]

    async def value(self, expression: str) -> float | None:
        """The one value of ``expression`` (None: no series)."""
        result = await self.query(expression)
        assert len(result) <= 1, (expression, result)
        return float(result[0]["value"][1]) if result else None

    async def values(self, expression: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in await self.query(expression)}


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[callable]:
    """``await prometheus(target)`` starts a Prometheus scraping ``target`` (``127.0.0.1:PORT``) every second and
    returns once it is ready. Missing prometheus is a failure, never a skip."""
    executable = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if executable is None:
        pytest.fail(PROMETHEUS_HINT, pytrace=False)
    started: list[Prometheus] = []

    async def start(target: str) -> Prometheus:
        root = tmp_path / f"prometheus-{len(started)}"
        root.mkdir()
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: image-proxy\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        log = root / "log"
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                [
                    executable,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        server = Prometheus(process, port, target, log)
        started.append(server)
        with trio.move_on_after(START_DEADLINE):
            while process.returncode is None:
                try:
                    status, _ = await server.get("/-/ready")
                except OSError:
                    status = 0
                if status == 200:
                    return server
                await trio.sleep(0.1)  # polling its readiness endpoint, with a deadline
        pytest.fail(f"Prometheus did not become ready within {START_DEADLINE:g} s:\n{log.read_text()[-3000:]}")

    try:
        yield start
    finally:
        for server in started:
            if server.process.returncode is None:
                server.process.terminate()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(10):
                    await server.process.wait()
                if server.process.returncode is None:
                    server.process.kill()
                    await server.process.wait()
