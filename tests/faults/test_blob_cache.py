"""The blob cache (--blob-cache) against the real registry behind the fault proxy, which counts what was
downloaded: blobs are fetched once, partial downloads resume, bad files are never served."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.faults.conftest import FaultImages, Layer
from tests.faults.proxy import FaultProxy, Stall

HANG_GUARD = 60.0


def cache_args(cache: Path, *extra: str) -> list[str]:
    return ["--tls-verify=false", "--stall-timeout", "1", "--blob-cache", str(cache), *extra]


def final(cache: Path, layer: Layer) -> Path:
    return cache / "blobs" / "sha256" / layer.digest.split(":")[1]


def blob_gets(fault: FaultProxy, layer: Layer) -> list:
    return fault.requests_for(f"/blobs/{layer.digest}$")


async def pull(fault_images: FaultImages, fault: FaultProxy, cache: Path, layer: Layer, *extra: str) -> None:
    async with ImageProxy.spawn(extra_args=cache_args(cache, *extra)) as proxy:
        img = await proxy.open_image(fault_images.ref(fault.port))
        assert await proxy.get_blob(img, layer.digest, layer.size) == layer.data


async def test_a_cached_blob_is_served_without_the_network(fault_images, fault, tmp_path):
    layer = fault_images.seed
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
        assert final(tmp_path, layer).read_bytes() == layer.data
        assert not list(final(tmp_path, layer).parent.glob("*.partial"))
        await pull(fault_images, fault, tmp_path, layer)  # a second process
    assert len(blob_gets(fault, layer)) == 1


async def test_ten_concurrent_readers_share_one_download(fault_images, fault, tmp_path):
    layer = fault_images.long
    results: list[bytes] = []
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(tmp_path)) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))

            async def read_blob() -> None:
                results.append(await proxy.get_blob(img, layer.digest, layer.size))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(read_blob)
    assert len(results) == 10 and all(r == layer.data for r in results)
    assert len(blob_gets(fault, layer)) == 1, "one upstream download"


async def test_an_interrupted_download_resumes_from_the_partial_file(fault_images, fault, tmp_path):
    """The first pull stalls for good at 40 % and gives up; the partial stays; the next pull asks only for
    the rest, so no byte is downloaded twice."""
    layer = fault_images.long
    cut = layer.size * 2 // 5
    rule = fault.add_rule(Stall(at=cut), path=f"/blobs/{layer.digest}$")
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(tmp_path, "--max-resumes", "0")) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))
            with pytest.raises(ProxyError):
                await proxy.get_blob(img, layer.digest, layer.size)
        partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
        assert partial.stat().st_size == cut and not final(tmp_path, layer).exists()
        fault.remove_rule(rule)
        await pull(fault_images, fault, tmp_path, layer)
    gets = blob_gets(fault, layer)
    assert [g.range for g in gets] == [None, f"bytes={cut}-"]
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()


async def test_a_corrupt_partial_is_removed_and_the_blob_fetched_again(fault_images, fault, tmp_path):
    layer = fault_images.small
    partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # not the blob's first 1000 bytes
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(tmp_path)) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))
            with pytest.raises(ProxyError, match=f"corrupted blob, expecting {layer.digest}"):
                await proxy.get_blob(img, layer.digest, layer.size)
        assert not partial.exists() and not final(tmp_path, layer).exists()
        await pull(fault_images, fault, tmp_path, layer)
    assert final(tmp_path, layer).read_bytes() == layer.data


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
async def test_a_damaged_cached_blob_is_never_served(fault_images, fault, tmp_path, damage):
    layer = fault_images.small
    path = final(tmp_path, layer)
    path.parent.mkdir(parents=True)
    data = bytearray(layer.data)
    if damage == "truncated":
        del data[-100:]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)  # asserts the bytes served are the blob's
    assert len(blob_gets(fault, layer)) == 1, "the damaged file was detected and the blob fetched again"
    assert path.read_bytes() == layer.data


async def test_a_complete_partial_left_by_a_kill_before_the_rename_is_committed_without_the_network(
    fault_images, fault, tmp_path
):
    layer = fault_images.small
    partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(layer.data)
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
    assert blob_gets(fault, layer) == [], "no Range request past the end (it would get a 416)"
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()


async def test_a_complete_partial_with_wrong_content_is_fetched_again(fault_images, fault, tmp_path):
    layer = fault_images.small
    partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * layer.size)
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
    assert [g.range for g in blob_gets(fault, layer)] == [None]
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()
