"""Small builders for the on-disk formats the local transports read, plus skopeo helpers.

Everything is written with the standard library: OCI layouts (any manifests, indexes, broken
files), ``docker save`` archives (old ``<id>/layer.tar`` and new ``blobs/sha256`` layouts) and
``skopeo copy`` wrappers used to compare with what the real skopeo produces.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A small deterministic tar holding regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def image_config(diff_ids: list[str], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "created": "2024-01-02T03:04:05.100Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"], "Labels": {"b": "2", "a": "<&>"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "test"}],
    }
    cfg.update(extra)
    return cfg


class OCILayout:
    """An OCI image layout being written under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, Any]] = []

    def blob(self, data: bytes) -> str:
        d = digest(data)
        (self.root / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        return d

    def descriptor(self, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": self.blob(data), "size": len(data), **extra}

    def image(
        self,
        files: dict[str, bytes] | None = None,
        *,
        docker: bool = False,
        config: dict[str, Any] | None = None,
        compress: bool = True,
    ) -> tuple[bytes, dict[str, Any]]:
        """Write one image (one layer); return (manifest bytes, its descriptor)."""
        layer_tar = tar_bytes(files if files is not None else {"hello.txt": b"hello\n"})
        layer_blob = gz(layer_tar) if compress else layer_tar
        cfg = config if config is not None else image_config([digest(layer_tar)])
        if docker:
            layer_type = DOCKER_LAYER_GZIP if compress else "application/vnd.docker.image.rootfs.diff.tar"
            doc = {
                "schemaVersion": 2,
                "mediaType": DOCKER_V2S2,
                "config": self.descriptor(DOCKER_CONFIG, dumps(cfg)),
                "layers": [self.descriptor(layer_type, layer_blob)],
            }
        else:
            doc = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": self.descriptor(OCI_CONFIG, dumps(cfg)),
                "layers": [self.descriptor(OCI_LAYER_GZIP if compress else OCI_LAYER, layer_blob)],
            }
        raw = dumps(doc)
        return raw, self.descriptor(DOCKER_V2S2 if docker else OCI_MANIFEST, raw)

    def add(self, desc: dict[str, Any], tag: str | None = None) -> None:
        entry = dict(desc)
        if tag is not None:
            entry["annotations"] = {REF_NAME: tag}
        self.index.append(entry)
        self.write_index()

    def write_index(self) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}
        (self.root / "index.json").write_bytes(dumps(doc))


def docker_archive(
    path: Path,
    layers: list[bytes],
    *,
    repo_tags: list[str] | None = None,
    new_layout: bool = False,
    compress_layers: bool = False,
    extra_images: int = 0,
) -> tuple[bytes, list[bytes]]:
    """A ``docker save`` archive with one image of ``layers`` (uncompressed tars).

    Returns (config bytes, layer tars). ``new_layout`` uses Docker 25's ``blobs/sha256/...``
    member names, otherwise the classic ``<id>/layer.tar``.
    """
    diff_ids = [digest(t) for t in layers]
    cfg = dumps(image_config(diff_ids))
    members: dict[str, bytes] = {}
    layer_paths = []
    for i, t in enumerate(layers):
        data = gz(t) if compress_layers else t
        name = f"blobs/sha256/{digest(data)[7:]}" if new_layout else f"{i:064x}/layer.tar"
        members[name] = data
        layer_paths.append(name)
    config_name = f"blobs/sha256/{digest(cfg)[7:]}" if new_layout else f"{digest(cfg)[7:]}.json"
    members[config_name] = cfg
    items = [{"Config": config_name, "RepoTags": repo_tags or [], "Layers": layer_paths}]
    items += [items[0]] * extra_images
    members["manifest.json"] = dumps(items)
    path.write_bytes(tar_bytes(members))
    return cfg, layers


def require_skopeo() -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        pytest.fail("skopeo is required for these tests: apt-get install skopeo", pytrace=False)
    return exe


def skopeo(*args: str) -> bytes:
    """Run skopeo (with an insecure policy: the images are local test data); return stdout."""
    exe = require_skopeo()
    proc = subprocess.run([exe, "--insecure-policy", *args], capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        pytest.fail(f"skopeo {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}", pytrace=False)
    return proc.stdout


def dir_image(root: Path, manifest: bytes, blobs: list[bytes]) -> Path:
    """A ``dir:`` image (skopeo's directory format) holding ``manifest`` and ``blobs``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "version").write_text("Directory Transport Version: 1.1\n")
    (root / "manifest.json").write_bytes(manifest)
    for b in blobs:
        (root / digest(b)[7:]).write_bytes(b)
    return root
