"""Session fixtures for partial access: layers built once, served by two nginx instances (multi-range on,
and ``max_ranges 1``: the S3 behaviour) from the same static registry tree."""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs
import pytest

from tests.partial.layers import Layer, estargz, sha256, small_files, zstd_chunked
from tests.partial.nginx import Nginx, StaticRegistry, nginx_process

BIG_FILES = 50
BIG_FILE_SIZE = 2 << 20  # 50 x 2 MiB of incompressible bytes: a ~100 MiB layer


@attrs.frozen
class PartialImages:
    big: Layer  # partial/big: one ~100 MiB zstd:chunked layer (64-byte footer, tar-split, annotations)
    layers: dict[str, Layer]  # partial/small, by name
    registry: StaticRegistry

    def ref(self, authority: str, repository: str) -> str:
        return f"docker://{authority}/{repository}:latest"


def _wrong_annotation() -> Layer:
    layer = zstd_chunked(small_files(seed=7))
    other = zstd_chunked(small_files(seed=8))
    key = "io.github.containers.zstd-chunked.manifest-checksum"
    return attrs.evolve(layer, annotations={**layer.annotations, key: other.annotations[key]})


@pytest.fixture(scope="session")
def partial_images(tmp_path_factory: pytest.TempPathFactory) -> PartialImages:
    rng = random.Random(6)
    big = zstd_chunked([(f"data/file{i:02d}.bin", rng.randbytes(BIG_FILE_SIZE)) for i in range(BIG_FILES)])
    layers = {
        "zstd64": zstd_chunked(small_files(seed=1)),
        "zstd40": zstd_chunked(small_files(seed=2), footer=40),
        "estargz": estargz(small_files(seed=3)),
        "stargz-legacy": estargz(small_files(seed=4), legacy=True),
        "footer-only": zstd_chunked(small_files(seed=5), annotate=False),
        "wrong-annotation": _wrong_annotation(),
        "plain": Layer(rng.randbytes(50_000), {}, b""),
    }
    registry = StaticRegistry(tmp_path_factory.mktemp("static-registry"))
    registry.put_image("partial/big", [big.descriptor()], [big.blob])
    registry.put_image(
        "partial/small", [layer.descriptor() for layer in layers.values()], [layer.blob for layer in layers.values()]
    )
    assert all(sha256(layer.blob) == layer.digest for layer in layers.values())
    return PartialImages(big, layers, registry)


@pytest.fixture(scope="session")
def nginx_multi(partial_images: PartialImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with nginx_process(tmp_path_factory.mktemp("nginx-multi"), partial_images.registry.root) as server:
        yield server


@pytest.fixture(scope="session")
def nginx_single(partial_images: PartialImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with nginx_process(tmp_path_factory.mktemp("nginx-single"), partial_images.registry.root, 1) as server:
        yield server
