"""Against the real registry (Debian docker-registry, distribution 2.8)."""

from __future__ import annotations

import json

from proxy.http.pool import ConnectionPool
from tests.http.registry import Registry

HEADERS = {"Docker-Distribution-API-Version": "registry/2.0", "Accept-Encoding": "identity"}


async def test_ping_and_unknown_manifest(docker_registry: Registry, pool: ConnectionPool) -> None:
    async with pool.request("GET", docker_registry.url("/v2/"), HEADERS) as response:
        assert response.status == 200
        assert response.headers.get("docker-distribution-api-version") == "registry/2.0"
        assert json.loads(await response.read_all(1 << 16)) == {}

    url = docker_registry.url("/v2/library/nothing/manifests/latest")
    accept = {**HEADERS, "Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with pool.request("GET", url, accept) as response:
        assert response.status == 404
        errors = json.loads(await response.read_all(1 << 16))["errors"]
        assert errors[0]["code"] in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")

    async with pool.request("HEAD", url, HEADERS) as response:
        assert response.status == 404
    assert pool.stats.connections_opened == 1  # keep-alive with the real server too
