"""Fixtures for the HTTP client tests: a scripted server, a pool with short deadlines, no ambient proxies."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # make ``tests.http`` importable however pytest was started
    sys.path.insert(0, str(ROOT))

from proxy.http.pool import ConnectionPool  # noqa: E402
from proxy.http.proxies import ProxyConfig  # noqa: E402
from tests.http.registry import docker_registry  # noqa: E402, F401  (a fixture, used by test_http_registry)
from tests.http.server import FAST, TestServer, serve  # noqa: E402


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with serve() as running:
        yield running


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    # ProxyConfig(): hermetic, whatever HTTP(S)_PROXY the machine has
    async with ConnectionPool(FAST, proxies=ProxyConfig()) as running:
        yield running
