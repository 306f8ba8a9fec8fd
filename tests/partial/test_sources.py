"""Partial access beyond nginx: zstd:chunked layers made by the real skopeo in the real docker-registry, the
blob cache and local layouts (no network at all)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import zstandard

from protocol.client import ImageProxy
from tests.faults.proxy import fault_proxy
from tests.partial.conftest import PartialImages
from tests.partial.layers import sha256
from tests.partial.nginx import Nginx
from tests.support.images import skopeo_copy
from tests.support.registry import PushedImages

ARGS = ["--tls-verify=false"]


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200, (path, response.status)
        return response.read()
    finally:
        conn.close()


async def test_skopeo_zstd_chunked_layers_tocs_equal_the_producers(registry_images: PushedImages, tmp_path):
    registry = registry_images.registry
    layout = registry_images.images.layout.path
    # skopeo 1.9.3 recompresses into an oci: destination (not when pushing): make the layers there, push as-is
    skopeo_copy(f"oci:{layout}:latest", f"oci:{tmp_path / 'zstd'}:latest", "--dest-compress-format", "zstd:chunked")
    skopeo_copy(
        f"oci:{tmp_path / 'zstd'}:latest",
        f"docker://{registry.authority}/partial/skopeo:latest",
        "--dest-tls-verify=false",
    )
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    manifest = json.loads(_get(registry.port, "/v2/partial/skopeo/manifests/latest", accept))
    layers = manifest["layers"]
    assert layers and all("io.containers.zstd-chunked.manifest-checksum" in d["annotations"] for d in layers)
    async with ImageProxy.spawn(extra_args=ARGS) as proxy:
        image = await proxy.open_image(f"docker://{registry.authority}/partial/skopeo:latest")
        for desc in layers:
            blob = _get(registry.port, f"/v2/partial/skopeo/blobs/{desc['digest']}")
            offset, length, _, _ = map(
                int, desc["annotations"]["io.containers.zstd-chunked.manifest-position"].split(":")
            )
            written = blob[offset : offset + length]  # what skopeo wrote, and vouched for in the annotation
            assert sha256(written) == desc["annotations"]["io.containers.zstd-chunked.manifest-checksum"]
            producers = zstandard.ZstdDecompressor().decompress(written, max_output_size=1 << 26)
            assert await proxy.get_layer_toc(image, desc["digest"]) == ("zstd:chunked", producers)
            ranges = [(len(blob) - 72, 72), (0, 4), (offset, length)]
            assert await proxy.get_blob_at(image, desc["digest"], ranges) == b"".join(
                blob[o : o + n] for o, n in ranges
            )


async def test_a_cached_blob_is_served_without_network(partial_images: PartialImages, nginx_multi: Nginx, tmp_path):
    layer = partial_images.layers["zstd64"]
    cache = tmp_path / "cache"
    async with (
        fault_proxy(nginx_multi.port) as fault,
        ImageProxy.spawn(extra_args=[*ARGS, "--blob-cache", str(cache)]) as proxy,
    ):
        image = await proxy.open_image(partial_images.ref(f"127.0.0.1:{fault.port}", "partial/small"))
        assert await proxy.get_blob(image, layer.digest, len(layer.blob)) == layer.blob
        await fault.settled()
        before = len(fault.requests)
        assert (
            await proxy.get_blob_at(image, layer.digest, [(100, 50), (0, 10)]) == layer.blob[100:150] + layer.blob[:10]
        )
        assert await proxy.get_layer_toc(image, layer.digest) == ("zstd:chunked", layer.toc)
        assert await proxy.get_layer_tar_split(image, layer.digest) == layer.tar_split
        assert len(fault.requests) == before


def write_layout(root: Path, layers: list, blobs: list[bytes]) -> None:
    (root / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    for blob in blobs:
        put(blob)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


async def test_local_layouts_serve_ranges_and_tocs(partial_images: PartialImages, tmp_path):
    chosen = [partial_images.layers[n] for n in ("zstd64", "estargz", "footer-only")]
    write_layout(tmp_path / "layout", [layer.descriptor() for layer in chosen], [layer.blob for layer in chosen])
    zstd64, stargz, footer_only = chosen
    async with ImageProxy.spawn() as proxy:
        image = await proxy.open_image(f"oci:{tmp_path / 'layout'}:latest")
        ranges = [(500, 100), (3, 7), (len(zstd64.blob) - 1, 1)]
        assert await proxy.get_blob_at(image, zstd64.digest, ranges) == b"".join(
            zstd64.blob[o : o + n] for o, n in ranges
        )
        assert await proxy.get_layer_toc(image, zstd64.digest) == ("zstd:chunked", zstd64.toc)
        assert await proxy.get_layer_tar_split(image, zstd64.digest) == zstd64.tar_split
        assert await proxy.get_layer_toc(image, stargz.digest) == ("estargz", stargz.toc)
        assert await proxy.get_layer_toc(image, footer_only.digest) == ("zstd:chunked", footer_only.toc)
