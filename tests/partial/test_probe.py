"""Probing a registry host for multi-range support, straight against Debian nginx (no fault proxy: its buffers
would read for us), measured with what nginx says it sent (``$body_bytes_sent``: what it handed its socket,
read or not). The probe asks for three bytes of a small blob of the same repository, so a host that ignores
multi-range requests (``max_ranges 1``, as S3) sends that small blob, never the 100 MiB layer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from proxy.http.pool import ConnectionPool
from proxy.http.proxies import ProxyConfig
from proxy.image import manifest as mf
from proxy.partial.fetch import host_ranges
from proxy.partial.planner import PROBE_MAX_BYTES, ByteRange, Support
from proxy.partial.service import open_ranges
from proxy.registry.client import RegistryClient, RegistrySettings
from proxy.registry.source import RegistrySource, open_registry
from tests.partial.conftest import PartialImages
from tests.partial.nginx import LogEntry, Nginx, settled_log

#: three small ranges far apart in the 100 MiB layer: three small spans, enough to probe for
RANGES = [ByteRange(1000, 10), ByteRange(40 << 20, 10), ByteRange(80 << 20, 10)]


@asynccontextmanager
async def registry_source(images: PartialImages, nginx: Nginx) -> AsyncIterator[RegistrySource]:
    """partial/big through a client of its own (what a host is known to do is remembered per client)."""
    client = RegistryClient(RegistrySettings(tls_verify=False))
    client.pool = ConnectionPool(client.settings.timeouts, client._ssl_context, proxies=ProxyConfig())  # hermetic
    try:
        reference = images.ref(nginx.authority, "partial/big")
        yield await open_registry(reference, reference.removeprefix("docker:"), client)
    finally:
        await client.aclose()


def config_of(images: PartialImages) -> mf.Descriptor:
    manifest = json.loads((images.registry.root / "v2/partial/big/manifests/latest").read_bytes())
    config = manifest["config"]
    return mf.Descriptor(config["mediaType"], config["digest"], config["size"])


def big_layer(images: PartialImages) -> mf.Descriptor:
    return mf.Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", images.big.digest, len(images.big.blob))


async def read_ranges(source: RegistrySource, images: PartialImages, probe_blobs, ranges=RANGES) -> None:
    big = images.big
    async with await open_ranges(source, big.digest, len(big.blob), "big", probe_blobs) as reader:
        assert await reader.read(ranges) == [big.blob[r.offset : r.end] for r in ranges]


def multi_range(entry: LogEntry) -> bool:
    return "," in entry.range


def blob_entries(entries: list[LogEntry], digest: str) -> list[LogEntry]:
    return [e for e in entries if e.path.endswith(f"/blobs/{digest}")]


async def test_a_host_ignoring_multi_range_requests_costs_the_probe_at_most_256_kib(
    partial_images: PartialImages, nginx_single: Nginx
):
    config, big = config_of(partial_images), partial_images.big
    since = nginx_single.log_size()
    async with registry_source(partial_images, nginx_single) as source:
        await read_ranges(source, partial_images, [config, big_layer(partial_images)])
        assert host_ranges(source.client, source.domain).support is Support.SINGLE
    entries = await settled_log(nginx_single, since)
    (probe,) = [e for e in entries if multi_range(e)]
    print(f"probe: {probe}")
    # the probe went to the config (the smallest blob), was answered with all of it, and that is all it cost
    assert probe.path.endswith(f"/blobs/{config.digest}") and probe.status == 200
    assert probe.body_bytes_sent == config.size <= PROBE_MAX_BYTES
    # the layer itself only ever got single ranges, each answered with just its bytes
    assert [(e.range, e.status, e.body_bytes_sent) for e in blob_entries(entries, big.digest)] == [
        (f"bytes={r.offset}-{r.end - 1}", 206, r.length) for r in RANGES
    ]


async def test_a_host_answering_multipart_gets_several_ranges_per_request(
    partial_images: PartialImages, nginx_multi: Nginx
):
    config, big = config_of(partial_images), partial_images.big
    since = nginx_multi.log_size()
    async with registry_source(partial_images, nginx_multi) as source:
        await read_ranges(source, partial_images, [config])
        assert host_ranges(source.client, source.domain).support is Support.MULTI
    probe, request = [e for e in await settled_log(nginx_multi, since) if multi_range(e)]
    size = config.size
    assert probe.path.endswith(f"/blobs/{config.digest}") and probe.status == 206
    assert probe.range == f"bytes=0-0,{size // 2}-{size // 2},{size - 1}-{size - 1}"
    assert request.path.endswith(f"/blobs/{big.digest}") and request.status == 206
    assert request.range == "bytes=" + ",".join(f"{r.offset}-{r.end - 1}" for r in RANGES)


async def test_without_a_small_blob_the_host_is_not_probed(partial_images: PartialImages, nginx_single: Nginx):
    big = partial_images.big
    since = nginx_single.log_size()
    async with registry_source(partial_images, nginx_single) as source:
        await read_ranges(source, partial_images, [big_layer(partial_images)])  # nothing of at most 256 KiB
        assert host_ranges(source.client, source.domain).support is Support.UNKNOWN
    entries = await settled_log(nginx_single, since)
    assert [(e.range.count(","), e.status) for e in blob_entries(entries, big.digest)] == [(0, 206)] * len(RANGES)
    assert not [e for e in entries if multi_range(e)]


async def test_a_probe_blob_the_registry_lacks_is_passed_over(partial_images: PartialImages, nginx_single: Nginx):
    config = config_of(partial_images)
    missing = mf.Descriptor(config.media_type, "sha256:" + "0" * 64, 10)  # smaller: tried first
    since = nginx_single.log_size()
    async with registry_source(partial_images, nginx_single) as source:
        await read_ranges(source, partial_images, [missing, config])
        assert host_ranges(source.client, source.domain).support is Support.SINGLE
    first, second = [e for e in await settled_log(nginx_single, since) if multi_range(e)]
    assert first.path.endswith(missing.digest) and first.status == 404
    assert second.path.endswith(config.digest) and second.status == 200


async def test_concurrent_calls_probe_a_host_once(partial_images: PartialImages, nginx_multi: Nginx):
    config = config_of(partial_images)
    since = nginx_multi.log_size()
    async with registry_source(partial_images, nginx_multi) as source:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(read_ranges, source, partial_images, [config])
        assert host_ranges(source.client, source.domain).support is Support.MULTI
    entries = [e for e in await settled_log(nginx_multi, since) if multi_range(e)]
    probes = [e for e in entries if config.digest in e.path]
    assert len(probes) == 1, entries
    assert len(entries) == 5 and all(e.status == 206 for e in entries)
