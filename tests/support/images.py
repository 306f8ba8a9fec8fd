"""Deterministic test images, written with the standard library only.

:func:`build_oci_layout` writes an OCI image layout holding any mix of single OCI images and
multi-platform images (an OCI index, whose instances may be OCI or Docker schema2 manifests, or a Docker
manifest list), each tagged with ``org.opencontainers.image.ref.name``. c/image (skopeo) only follows
``index.json`` entries typed as an OCI manifest or index, so a schema2 image is reachable only through an
index: the standard ``v2s2`` tag is a one-entry OCI index, and Docker lists are listed as OCI indexes.

Everything is byte-for-byte reproducible: tar entries have fixed owners and mtimes, gzip headers carry
mtime 0, JSON is compact with a fixed key order, and "random" contents come from SHAKE-256 of a seed.
With ``gzip_level=0`` layers use hand-written stored deflate blocks, which are identical on every machine
(zlib and zlib-ng compress differently; nothing stores differently), so committed fixtures such as
``examples/hello`` can be regenerated exactly.

:func:`standard_layout` builds the set the tests use; :func:`transport_copies` makes ``dir:``,
``oci-archive:`` and ``docker-archive:`` copies of an image with the real ``skopeo copy``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

#: fixed timestamps: tar mtimes and the config's ``created``/history dates
MTIME = 1_704_164_645  # 2024-01-02T03:04:05Z
CREATED = "2024-01-02T03:04:05Z"

SKOPEO_HINT = "skopeo is required: apt-get install skopeo"


def platform_flags(architecture: str, os: str = "linux") -> tuple[str, ...]:
    """Server flags choosing an index instance independently of the machine running the tests."""
    return ("--override-os", os, "--override-arch", architecture)


AMD64 = platform_flags("amd64")
ARM64 = platform_flags("arm64")
S390X = platform_flags("s390x")

Format = Literal["oci", "docker"]


# ---------------------------------------------------------------------------------------- primitives


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact JSON in insertion order (what the builders hash and write)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def pseudo_random(seed: str, size: int) -> bytes:
    """``size`` incompressible but reproducible bytes."""
    return hashlib.shake_256(seed.encode()).digest(size)


def stored_gzip(data: bytes) -> bytes:
    """A gzip member of stored (uncompressed) deflate blocks: identical bytes on every platform."""
    out = bytearray(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # no flags, mtime 0, OS unknown
    chunks = [data[i : i + 0xFFFF] for i in range(0, len(data), 0xFFFF)] or [b""]
    for index, chunk in enumerate(chunks):
        final = 1 if index == len(chunks) - 1 else 0
        out += bytes([final]) + struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF) + chunk
    out += struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return bytes(out)


def deterministic_gzip(data: bytes, level: int) -> bytes:
    """gzip with mtime 0; level 0 is :func:`stored_gzip` (portable), others depend on the local zlib."""
    return stored_gzip(data) if level == 0 else gzip.compress(data, compresslevel=level, mtime=0)


def build_tar(files: Mapping[str, bytes]) -> bytes:
    """A ustar archive of ``files`` (plus their parent directories), sorted, owned by root, fixed mtime,
    without record padding."""
    dirs = sorted({str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parents) - 1)})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in dirs:
            info = _tarinfo(name + "/", tarfile.DIRTYPE, 0o755)
            tar.addfile(info)
        for name in sorted(files):
            content = files[name]
            info = _tarinfo(name, tarfile.REGTYPE, 0o644)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        end = tar.offset
    # two zero blocks end the archive; drop tarfile's padding to a 10 KiB record, as Go's archive/tar does
    return buffer.getvalue()[: end + 2 * tarfile.BLOCKSIZE]


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


# ---------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class LayerSpec:
    files: Mapping[str, bytes]
    created_by: str = "COPY . /"


@dataclass(frozen=True)
class ImageSpec:
    layers: tuple[LayerSpec, ...]
    platform: Platform = Platform()
    format: Format = "oci"
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    cmd: tuple[str, ...] = ("/bin/sh",)
    labels: Mapping[str, str] = field(default_factory=dict)
    gzip_level: int = 6


@dataclass(frozen=True)
class IndexSpec:
    """A multi-platform image; ``format="docker"`` makes a manifest list of schema2 instances."""

    instances: tuple[ImageSpec, ...]
    format: Format = "oci"


# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BuiltLayer:
    digest: str
    size: int
    media_type: str
    diff_id: str
    files: tuple[str, ...]

    def info(self) -> dict[str, Any]:
        """The entry GetLayerInfo reports for this layer."""
        return {"digest": self.digest, "size": self.size, "media_type": self.media_type}


@dataclass(frozen=True)
class BuiltImage:
    """One single-platform image; ``ref`` opens it (for an index instance, the index's ref)."""

    path: Path
    tag: str | None
    ref: str
    platform: Platform
    manifest_digest: str
    manifest_size: int
    manifest_media_type: str
    manifest: bytes
    config_digest: str
    config_size: int
    config_media_type: str
    config: bytes
    layers: tuple[BuiltLayer, ...]

    def blob(self, digest: str) -> bytes:
        return read_blob(self.path, digest)

    @property
    def config_json(self) -> dict[str, Any]:
        return json.loads(self.config)


@dataclass(frozen=True)
class BuiltIndex:
    """An OCI index or Docker manifest list; ``instances`` is keyed by architecture."""

    path: Path
    tag: str
    ref: str
    digest: str
    size: int
    media_type: str
    manifest: bytes
    instances: Mapping[str, BuiltImage]


@dataclass(frozen=True)
class Layout:
    path: Path
    images: Mapping[str, BuiltImage | BuiltIndex]


def read_blob(layout: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":", 1)
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()


# ---------------------------------------------------------------------------------------- builder


class _Writer:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        path = self.root / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return digest, len(data)

    def image(self, spec: ImageSpec, tag: str | None, ref: str) -> BuiltImage:
        docker = spec.format == "docker"
        layers: list[BuiltLayer] = []
        history: list[dict[str, Any]] = []
        for layer in spec.layers:
            tar = build_tar(layer.files)
            digest, size = self.blob(deterministic_gzip(tar, spec.gzip_level))
            media_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
            layers.append(BuiltLayer(digest, size, media_type, sha256_digest(tar), tuple(sorted(layer.files))))
            history.append({"created": CREATED, "created_by": layer.created_by})
        history.append({"created": CREATED, "created_by": f"CMD {json.dumps(list(spec.cmd))}", "empty_layer": True})
        config_doc: dict[str, Any] = {
            "created": CREATED,
            "author": "image-proxy tests",
            **spec.platform.as_dict(),
            "config": {
                "Env": list(spec.env),
                "Cmd": list(spec.cmd),
                "WorkingDir": "/",
                "Labels": dict(spec.labels),
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": history,
        }
        if docker:  # what `docker build` writes too; an OCI conversion drops these, changing the digest
            config_doc["container_config"] = {"Cmd": list(spec.cmd), "Labels": dict(spec.labels)}
            config_doc["docker_version"] = "24.0.7"
        config = canonical_json(config_doc)
        config_digest, config_size = self.blob(config)
        manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        config_type = DOCKER_CONFIG if docker else OCI_CONFIG
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in layers],
        }
        manifest = canonical_json(manifest_doc)
        manifest_digest, manifest_size = self.blob(manifest)
        return BuiltImage(
            path=self.root,
            tag=tag,
            ref=ref,
            platform=spec.platform,
            manifest_digest=manifest_digest,
            manifest_size=manifest_size,
            manifest_media_type=manifest_type,
            manifest=manifest,
            config_digest=config_digest,
            config_size=config_size,
            config_media_type=config_type,
            config=config,
            layers=tuple(layers),
        )

    def index(self, spec: IndexSpec, tag: str, ref: str) -> BuiltIndex:
        docker = spec.format == "docker"
        instances: dict[str, BuiltImage] = {}
        entries = []
        for instance in spec.instances:
            if docker and instance.format != "docker":
                instance = replace(instance, format="docker")  # a Docker list holds schema2 manifests only
            built = self.image(instance, None, ref)
            instances[instance.platform.architecture] = built
            entries.append(
                {
                    "mediaType": built.manifest_media_type,
                    "digest": built.manifest_digest,
                    "size": built.manifest_size,
                    "platform": instance.platform.as_dict(),
                }
            )
        media_type = DOCKER_LIST if docker else OCI_INDEX
        manifest = canonical_json({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})
        digest, size = self.blob(manifest)
        return BuiltIndex(self.root, tag, ref, digest, size, media_type, manifest, instances)


def build_oci_layout(root: Path, images: Mapping[str, ImageSpec | IndexSpec]) -> Layout:
    """Write an OCI layout at ``root`` with one ``index.json`` entry per ``{tag: spec}``, in order."""
    root = Path(root).absolute()
    writer = _Writer(root)
    built: dict[str, BuiltImage | BuiltIndex] = {}
    entries = []
    for tag, spec in images.items():
        ref = f"oci:{root}:{tag}"
        if isinstance(spec, IndexSpec):
            index = writer.index(spec, tag, ref)
            built[tag] = index
            # c/image only follows index.json entries typed OCI manifest/index; a Docker list is read anyway
            media_type, digest, size = OCI_INDEX, index.digest, index.size
        elif spec.format == "docker":
            raise ValueError(
                f"{tag}: c/image ignores index.json entries typed {DOCKER_MANIFEST}; "
                "wrap a schema2 image in IndexSpec((image,)) instead"
            )
        else:
            image = writer.image(spec, tag, ref)
            built[tag] = image
            media_type, digest, size = image.manifest_media_type, image.manifest_digest, image.manifest_size
        entries.append({"mediaType": media_type, "digest": digest, "size": size, "annotations": {REF_NAME: tag}})
    (root / "index.json").write_bytes(canonical_json({"schemaVersion": 2, "manifests": entries}))
    return Layout(root, built)


# ---------------------------------------------------------------------------------------- the standard set


def _arch_image(platform: Platform, fmt: Format = "oci") -> ImageSpec:
    name = platform.architecture + (f"/{platform.variant}" if platform.variant else "")
    return ImageSpec(
        layers=(
            LayerSpec({"etc/platform": f"{platform.os}/{name}\n".encode()}, "ADD platform /etc/"),
            LayerSpec({f"opt/{platform.architecture}/payload.bin": pseudo_random(f"payload-{name}", 4096)}),
        ),
        platform=platform,
        format=fmt,
        env=("PATH=/usr/bin:/bin", f"ARCH={platform.architecture}"),
        cmd=("/bin/true",),
        labels={"org.opencontainers.image.title": f"multi-{platform.architecture}"},
    )


SINGLE = ImageSpec(
    layers=(
        LayerSpec({"etc/os-release": b'NAME="Test"\nID=test\n'}, "ADD os-release /etc/"),
        LayerSpec(
            {"usr/share/hello/greeting.txt": b"hello, world\n", "usr/share/hello/README": b"test image\n"},
            "COPY hello /usr/share/hello",
        ),
        # larger than a pipe buffer (64 KiB), so every reader has to drain while the server writes
        LayerSpec({"var/lib/data.bin": pseudo_random("single-data", 200_000)}, "COPY data.bin /var/lib/"),
    ),
    env=("PATH=/usr/bin:/bin", "GREETING=hello"),
    cmd=("/bin/sh", "-c", "cat /usr/share/hello/greeting.txt"),
    labels={"org.opencontainers.image.title": "single", "org.example.purpose": "tests"},
)

MULTI = IndexSpec(
    instances=(
        _arch_image(Platform("linux", "amd64")),
        _arch_image(Platform("linux", "arm64", "v8")),
        _arch_image(Platform("linux", "s390x")),
    )
)

#: a schema2 image; an OCI layout can only reach it through an index (see build_oci_layout)
V2S2 = ImageSpec(
    layers=(
        LayerSpec({"etc/docker-format": b"schema2\n"}, "ADD docker-format /etc/"),
        LayerSpec({"srv/blob.bin": pseudo_random("v2s2", 70_000)}, "COPY blob.bin /srv/"),
    ),
    format="docker",
    labels={"org.opencontainers.image.title": "v2s2"},
)

V2LIST = IndexSpec(
    instances=(
        _arch_image(Platform("linux", "amd64"), "docker"),
        _arch_image(Platform("linux", "arm64", "v8"), "docker"),
    ),
    format="docker",
)

#: one incompressible 2 MiB layer, for transfers that must block on a full pipe
BIG = ImageSpec(layers=(LayerSpec({"big.bin": pseudo_random("big", 2 << 20)}, "COPY big.bin /"),), gzip_level=0)

#: an image without layers (GetLayerInfo gives ``[]``)
NO_LAYERS = ImageSpec(layers=(), labels={"org.opencontainers.image.title": "no-layers"})

STANDARD: Mapping[str, ImageSpec | IndexSpec] = {
    "latest": SINGLE,
    "multi": MULTI,
    "v2s2": IndexSpec(instances=(V2S2,)),
    "v2list": V2LIST,
    "big": BIG,
    "nolayers": NO_LAYERS,
}


@dataclass(frozen=True)
class StandardImages:
    """The standard set; ``copies`` (``dir``/``oci-archive``/``docker-archive`` of ``single``) only after
    :func:`with_transport_copies`."""

    layout: Layout
    single: BuiltImage
    multi: BuiltIndex
    v2s2: BuiltImage  # the schema2 instance of the one-entry OCI index tagged ``v2s2``
    v2list: BuiltIndex
    big: BuiltImage
    nolayers: BuiltImage
    copies: Mapping[str, TransportCopy] = field(default_factory=dict)


def standard_layout(root: Path) -> StandardImages:
    """Every standard image in one OCI layout at ``root``."""
    layout = build_oci_layout(root, STANDARD)
    images = layout.images

    def image(tag: str) -> BuiltImage:
        found = images[tag]
        assert isinstance(found, BuiltImage)
        return found

    def index(tag: str) -> BuiltIndex:
        found = images[tag]
        assert isinstance(found, BuiltIndex)
        return found

    return StandardImages(
        layout=layout,
        single=image("latest"),
        multi=index("multi"),
        v2s2=index("v2s2").instances["amd64"],
        v2list=index("v2list"),
        big=image("big"),
        nolayers=image("nolayers"),
    )


# ---------------------------------------------------------------------------------------- skopeo copies


def require_skopeo() -> str:
    """The skopeo executable; raises with the install hint when missing."""
    path = shutil.which("skopeo")
    if path is None:
        raise RuntimeError(SKOPEO_HINT)
    return path


def skopeo_copy(source: str, destination: str, *extra: str, timeout: float = 120.0) -> None:
    argv = [require_skopeo(), "--insecure-policy", "copy", "--quiet", *extra, source, destination]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


@dataclass(frozen=True)
class TransportCopy:
    """A copy of ``source`` in another transport; its manifest may differ (docker-archive converts)."""

    transport: str
    ref: str
    path: Path
    source: BuiltImage


def transport_copies(image: BuiltImage, root: Path) -> dict[str, TransportCopy]:
    """``dir:``, ``oci-archive:`` and ``docker-archive:`` copies of ``image`` under ``root``, made by skopeo."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    name = image.tag or "image"
    targets = {
        "dir": (root / f"{name}.dir", "dir:{p}", "dir:{p}"),
        "oci-archive": (root / f"{name}.oci.tar", "oci-archive:{p}:{name}", "oci-archive:{p}:{name}"),
        "docker-archive": (
            root / f"{name}.docker.tar",
            "docker-archive:{p}:localhost/{name}:latest",
            "docker-archive:{p}",
        ),
    }
    copies = {}
    for transport, (path, write_ref, read_ref) in targets.items():
        skopeo_copy(image.ref, write_ref.format(p=path, name=name))
        copies[transport] = TransportCopy(transport, read_ref.format(p=path, name=name), path, image)
    return copies


def with_transport_copies(images: StandardImages, root: Path) -> StandardImages:
    """``images`` plus skopeo-made transport copies of ``images.single`` under ``root``."""
    return replace(images, copies=transport_copies(images.single, root))
