"""Fixtures for the fault tests: the real registry (session-wide, from tests/conftest.py) holding one more image,
``test/faults``, whose layers have the sizes the matrix needs, and a fault proxy in front of it per test.

Every test under tests/faults that uses the ``fault`` fixture runs once per transport (test ids ``[plain-...]``
and ``[tls-...]``): the fault proxy serves plain HTTP (the daemon's TLS attempt is refused, and it falls back), or
HTTPS with a certificate for 127.0.0.1 from a trustme CA made once per session (the daemon runs with
``--tls-verify=false``, so no CA needs to be handed to it), every fault then reaching the daemon inside TLS.
A module can narrow that with a module-level ``TRANSPORTS`` tuple. (The parametrization is done here, on the
``fault`` fixture itself, so that tests/daemon, which imports ``fault``, keeps one plain-HTTP proxy.)
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.proxy import FaultProxy, fault_proxy
from tests.faults.transport import TRANSPORTS, tls_server_context
from tests.support.images import (
    CREATED,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    build_tar,
    canonical_json,
    pseudo_random,
    sha256_digest,
    skopeo_copy,
    stored_gzip,
)
from tests.support.registry import PushedImages

REPOSITORY = "test/faults"
#: the seed case's blob (quay.io/fedora/fedora-coreos layer a283e9be...): 2,759,859 bytes
SEED_SIZE = 2_759_859
#: long enough for three faults more than 1 MiB apart (a resume after 1 MiB of progress is always allowed)
LONG_SIZE = 9 << 19  # 4.5 MiB
SMALL_SIZE = 96 << 10


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    data: bytes


@dataclass(frozen=True)
class FaultImages:
    """``test/faults:latest`` (layers: seed, long, small) next to the standard images, in one registry."""

    registry_port: int
    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    seed: Layer
    long: Layer
    small: Layer
    standard: PushedImages

    def ref(self, port: int, repository: str = REPOSITORY, tag: str = "latest") -> str:
        """A docker:// reference through 127.0.0.1:``port`` (the fault proxy's)."""
        return f"docker://127.0.0.1:{port}/{repository}:{tag}"


def sized_gzip(data: bytes, size: int) -> bytes:
    """A valid gzip member of ``data`` (stored blocks) exactly ``size`` bytes long: the header's FCOMMENT
    field takes up the difference."""
    plain = stored_gzip(data)
    pad = size - len(plain)
    if pad < 2:
        raise ValueError(f"{len(plain)} bytes of stored gzip do not fit in {size}")
    header = b"\x1f\x8b\x08\x10" + struct.pack("<I", 0) + b"\x00\xff"  # FCOMMENT, mtime 0, OS unknown
    comment = b"p" * (pad - 1) + b"\x00"
    body = plain[10:]
    out = header + comment + body
    assert len(out) == size and zlib.decompress(out, wbits=31) == data
    return out


def layer_of_size(name: str, size: int) -> tuple[bytes, bytes]:
    """(gzip blob of exactly ``size`` bytes, its tar): one incompressible file as large as fits."""
    content = max(0, size - 4096)
    while True:
        tar = build_tar({name: pseudo_random(name, content)})
        if len(stored_gzip(tar)) <= size - 2:
            return sized_gzip(tar, size), tar
        content -= 512


def write_layout(root: Path) -> tuple[dict[str, Layer], bytes, bytes]:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layers: dict[str, Layer] = {}
    diff_ids = []
    for name, size in (("seed", SEED_SIZE), ("long", LONG_SIZE), ("small", SMALL_SIZE)):
        blob, tar = layer_of_size(f"{name}.bin", size)
        layers[name] = Layer(put(blob), len(blob), blob)
        diff_ids.append(sha256_digest(tar))
    config = canonical_json(
        {
            "created": CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": f"COPY {name}.bin /"} for name in layers],
        }
    )
    config_digest = put(config)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": x.digest, "size": x.size} for x in layers.values()],
        }
    )
    manifest_digest = put(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {REF_NAME: "faults"},
            }
        ],
    }
    (root / "index.json").write_bytes(canonical_json(index))
    return layers, config, manifest


@pytest.fixture(scope="session")
def fault_images(registry_images: PushedImages, tmp_path_factory: pytest.TempPathFactory) -> FaultImages:
    root = tmp_path_factory.mktemp("fault-images") / "layout"
    return push_fault_images(root, registry_images.registry.authority, registry_images)


def push_fault_images(
    root: Path, authority: str, standard: PushedImages, *copy_flags: str, repository: str = REPOSITORY
) -> FaultImages:
    """test/faults' layout written under ``root`` and pushed (plain HTTP) to ``authority/repository:latest``."""
    layers, config, manifest = write_layout(root)
    skopeo_copy(
        f"oci:{root}:faults", f"docker://{authority}/{repository}:latest", "--dest-tls-verify=false", *copy_flags
    )
    return FaultImages(
        registry_port=int(authority.rsplit(":", 1)[1]),
        manifest_digest=sha256_digest(manifest),
        manifest=manifest,
        config_digest=sha256_digest(config),
        config=config,
        seed=layers["seed"],
        long=layers["long"],
        small=layers["small"],
        standard=standard,
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test here that uses ``fault`` over each transport (the module's ``TRANSPORTS`` if it has one)."""
    if "fault" in metafunc.fixturenames:
        transports = getattr(metafunc.module, "TRANSPORTS", TRANSPORTS)
        metafunc.parametrize("fault", transports, indirect=True, ids=list(transports))


@pytest.fixture
async def fault(fault_images: FaultImages, request: pytest.FixtureRequest) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the session's registry, without rules: plain HTTP, or TLS when
    :func:`pytest_generate_tests` asks for it (tests/daemon, which imports this fixture, always gets plain)."""
    transport = getattr(request, "param", "plain")
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    tls = tls_server_context() if transport == "tls" else None
    async with fault_proxy(fault_images.registry_port, tls=tls) as proxy:
        assert proxy.transport == transport
        yield proxy
