"""GetBlobAt and GetLayerTOC against Debian nginx serving blob files, multi-range on and off (``max_ranges 1``
answers a multi-range request with 200 and the whole file, as S3 does), through the fault proxy, which
counts every byte."""

from __future__ import annotations

import random

import pytest

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.faults.proxy import Answer, FaultProxy, Flip, Stall, fault_proxy
from tests.partial.conftest import PartialImages
from tests.partial.nginx import Nginx, settled_log

ARGS = ["--tls-verify=false"]


def blob_requests(fault: FaultProxy) -> list:
    return fault.requests_for(r"/blobs/sha256:")


def parts_of(record) -> int:
    return 0 if record.range is None else record.range.count(",") + 1


@pytest.fixture(params=["multi", "single"])
def nginx(request, nginx_multi: Nginx, nginx_single: Nginx) -> Nginx:
    return nginx_multi if request.param == "multi" else nginx_single


async def test_toc_and_tar_split_of_a_100_mib_layer_transfer_under_2_percent(partial_images: PartialImages, nginx):
    big = partial_images.big
    async with fault_proxy(nginx.port) as fault, ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/big"))
        assert await proxy.get_layer_toc(image, big.digest) == ("zstd:chunked", big.toc)
        assert await proxy.get_layer_tar_split(image, big.digest) == big.tar_split
        await fault.settled()
    size = len(big.blob)
    assert size > 100 << 20
    sent = sum(r.body_sent for r in blob_requests(fault))
    assert sent < size * 0.02, f"{sent} bytes of a {size}-byte blob"
    assert all(r.range is not None and r.status == 206 for r in blob_requests(fault)), blob_requests(fault)


async def test_many_ranges_in_any_order(partial_images: PartialImages, nginx):
    big = partial_images.big
    rng = random.Random(11)
    ranges = [(rng.randrange(0, len(big.blob) - 5000), rng.randrange(1, 5000)) for _ in range(40)]
    ranges += [(len(big.blob) - 3 * (1 << 20), 3 << 20), (0, 10), (5, 10)]  # a large one, then overlapping ones
    expected = b"".join(big.blob[o : o + n] for o, n in ranges)
    async with fault_proxy(nginx.port) as fault, ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/big"))
        assert await proxy.get_blob_at(image, big.digest, ranges) == expected
        # the host's behaviour is remembered: a second call makes no probe
        first = len(blob_requests(fault))
        assert await proxy.get_blob_at(image, big.digest, ranges[:10]) == expected[: sum(n for _, n in ranges[:10])]
        await fault.settled()
    multi = [r for r in blob_requests(fault) if parts_of(r) > 1]
    wanted = sum(n for _, n in ranges)
    ignored = sum(r.body_sent for r in multi if r.status == 200)
    fetched = sum(r.body_sent for r in blob_requests(fault)) - ignored
    print(f"requested {wanted} bytes; fetched {fetched} in ranges, {ignored} in a 200 to the probe")
    assert fetched < wanted + 64 * 1024 * 2  # merge gaps (< 1 KiB each) and multipart headers
    # the probe: three bytes of the image's smallest blob (its config), not of the layer
    probe = multi[0]
    assert big.digest not in probe.target and probe.range is not None and probe.range.startswith("bytes=0-0,")
    if nginx.max_ranges is None:
        assert len(multi) > 1 and all(r.status == 206 for r in multi)
        assert all(big.digest in r.target for r in multi[1:])
    else:
        # answered 200 with all of that small blob, and single ranges only from then on
        assert len(multi) == 1 and probe.status == 200
        assert ignored <= 256 * 1024
        assert all(parts_of(r) == 1 for r in blob_requests(fault)[first:])


async def test_a_stalled_range_resumes(partial_images: PartialImages, nginx_multi: Nginx):
    big = partial_images.big
    offset = 10 << 20
    async with (
        fault_proxy(nginx_multi.port) as fault,
        ImageProxy.spawn(extra_args=[*ARGS, "--stall-timeout", "1"]) as proxy,
    ):
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/big"))
        fault.add_rule(Stall(at=offset + (1 << 20)), path=r"/blobs/sha256:", nth=1, ranged=True)
        data = await proxy.get_blob_at(image, big.digest, [(offset, 2 << 20)])
        assert data == big.blob[offset : offset + (2 << 20)]
        await fault.settled()
    ranged = [r.range for r in blob_requests(fault)]
    assert ranged == [
        f"bytes={offset}-{offset + (2 << 20) - 1}",
        f"bytes={offset + (1 << 20)}-{offset + (2 << 20) - 1}",
    ]


async def test_416_halves_the_ranges_per_request(partial_images: PartialImages, nginx_multi: Nginx):
    big = partial_images.big
    ranges = [(i * 100_000, 100) for i in range(40)]
    async with fault_proxy(nginx_multi.port) as fault, ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/big"))
        # after the probe (on the config: multipart), the first request of the layer's ranges is refused
        fault.add_rule(Answer(416), path=big.digest, nth=1, ranged=True)
        assert await proxy.get_blob_at(image, big.digest, ranges) == b"".join(big.blob[o : o + n] for o, n in ranges)
        await fault.settled()
    requests = fault.requests_for(big.digest)
    assert requests[0].status == 416 and parts_of(requests[0]) == 40
    assert all(1 < parts_of(r) <= 32 and r.status == 206 for r in requests[1:])


async def test_a_probe_refused_with_416_means_single_ranges(partial_images: PartialImages, nginx_multi: Nginx):
    big = partial_images.big
    ranges = [(i * 100_000, 100) for i in range(10)]
    async with fault_proxy(nginx_multi.port) as fault, ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/big"))
        fault.add_rule(Answer(416), path=r"/blobs/sha256:", ranged=True, nth=1)  # the probe's three ranges
        assert await proxy.get_blob_at(image, big.digest, ranges) == b"".join(big.blob[o : o + n] for o, n in ranges)
        await fault.settled()
    (probe,) = [r for r in blob_requests(fault) if parts_of(r) > 1]
    assert probe.status == 416 and big.digest not in probe.target
    assert [(parts_of(r), r.status) for r in fault.requests_for(big.digest)] == [(1, 206)] * len(ranges)


async def test_a_range_outside_the_blob_fails_in_finish_pipe(partial_images: PartialImages, nginx_multi: Nginx):
    layer = partial_images.layers["plain"]
    async with ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(nginx_multi.authority, "partial/small"))
        with pytest.raises(
            ProxyError, match=rf"range 1 \(offset 49990, length 11\) is outside .*{layer.digest}, which has 50000 bytes"
        ):
            await proxy.get_blob_at(image, layer.digest, [(0, 1), (49_990, 11)])
        assert await proxy.get_blob_at(image, layer.digest, [(49_990, 10)]) == layer.blob[49_990:]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("zstd64", "zstd:chunked"), ("zstd40", "zstd:chunked"), ("estargz", "estargz"), ("stargz-legacy", "estargz")],
)
async def test_annotated_tocs(partial_images: PartialImages, nginx_single: Nginx, name, fmt):
    layer = partial_images.layers[name]
    async with ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(nginx_single.authority, "partial/small"))
        assert await proxy.get_layer_toc(image, layer.digest) == (fmt, layer.toc)


async def test_a_toc_not_matching_its_annotation_is_an_error(partial_images: PartialImages, nginx_single: Nginx):
    layer = partial_images.layers["wrong-annotation"]
    async with ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(nginx_single.authority, "partial/small"))
        with pytest.raises(
            ProxyError, match=rf"layer {layer.digest}: the TOC's digest is sha256:\w+, but the layer's annotation says"
        ):
            await proxy.get_layer_toc(image, layer.digest)


async def test_a_footer_without_annotation_is_only_a_hint(partial_images: PartialImages, nginx_single: Nginx):
    layer = partial_images.layers["footer-only"]
    async with fault_proxy(nginx_single.port) as fault, ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/small"))
        # the TOC the footer points to is returned only after the whole layer matched its digest
        assert await proxy.get_layer_toc(image, layer.digest) == ("zstd:chunked", layer.toc)
        assert any(r.range is None for r in fault.requests_for(layer.digest))
        # a forged footer (served bytes that are not the layer's) never yields a TOC
        footer_byte = len(layer.blob) - 70
        fault.add_rule(Flip(at=footer_byte), path=layer.digest, ranged=None)
        with pytest.raises(ProxyError, match=rf"layer {layer.digest}: .*(corrupted blob|footer|TOC)"):
            await proxy.get_layer_toc(image, layer.digest)
        # the daemon keeps serving
        assert await proxy.get_blob_at(image, layer.digest, [(0, 4)]) != b""


async def test_a_layer_without_toc(partial_images: PartialImages, nginx_single: Nginx):
    layer = partial_images.layers["plain"]
    async with ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(nginx_single.authority, "partial/small"))
        with pytest.raises(ProxyError, match=rf"layer {layer.digest}: the layer has no zstd:chunked or eStargz"):
            await proxy.get_layer_toc(image, layer.digest)
        with pytest.raises(ProxyError, match="the estargz layer has no tar-split"):
            await proxy.get_layer_tar_split(image, partial_images.layers["estargz"].digest)


async def test_get_blob_at_from_a_host_ignoring_multi_range_requests_costs_at_most_256_kib_more(
    partial_images: PartialImages, nginx_single: Nginx
):
    """3 small ranges of the 100 MiB layer, straight to nginx (no fault proxy reading for us), measured with
    what nginx handed its sockets (``$body_bytes_sent``). A probe on the layer itself, abandoned at once when
    answered 200, cost 3.9 MB: socket buffers, nginx's most of all, fill before the client can close."""
    big = partial_images.big
    ranges = [(1000, 10), (40 << 20, 10), (80 << 20, 10)]
    since = nginx_single.log_size()
    async with ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(partial_images.ref(nginx_single.authority, "partial/big"))
        assert await proxy.get_blob_at(image, big.digest, ranges) == b"".join(big.blob[o : o + n] for o, n in ranges)
    ranged = [e for e in await settled_log(nginx_single, since) if e.range]  # GetBlobAt's requests
    probes = [e for e in ranged if "," in e.range]
    print(f"probes: {probes}")
    assert all(e.body_bytes_sent <= 256 * 1024 for e in probes), probes
    assert sum(e.body_bytes_sent for e in ranged) <= 256 * 1024 + sum(n for _, n in ranges), ranged
