"""Where ``image-proxy copy`` writes an image: an OCI image layout (``oci:DIR[:TAG]``) or skopeo's directory
layout (``dir:DIR``), both readable by skopeo, podman and other tools.

Nothing unverified ever carries a blob's name: each blob is written to a temporary file beside its final name,
and only once the pull has checked its size and digest is it fsynced and renamed into place (then the directory
is fsynced). The manifest goes in last, then ``index.json`` (OCI) or ``manifest.json`` (dir) is replaced
atomically, so an interrupted copy leaves at most some verified blobs and stray temporary files, never a layout
that names a missing or partial blob. A blob already present under its name is hashed and kept when it is right.

What is written is the single image the proxy returns: for a multi-platform image (an index or manifest list)
that is the instance chosen for this host (or ``--override-os/--override-arch/--override-variant``), not the
index. A Docker schema2 image is written as the OCI manifest the proxy converted it to, stored under that
manifest's own digest (the source's digest is kept in an annotation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Protocol

import trio

from protocol.client.pull import BlobDescriptor, PulledImage

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
#: annotation on the index entry: the digest the source (registry) gave when it differs from the stored one
SOURCE_DIGEST = "io.github.image-proxy.source-digest"
DIR_VERSION = b"Directory Transport Version: 1.1\n"
_HASH_CHUNK = 1 << 20


class DestinationError(Exception):
    """A destination that cannot be written: bad syntax, or a directory that is something else."""


class Destination(Protocol):
    description: str

    async def prepare(self) -> None: ...

    async def sink(self, blob: BlobDescriptor) -> BlobFile | None: ...

    async def finish(self, image: PulledImage) -> None: ...


def parse_destination(text: str) -> OciLayoutDestination | DirDestination:
    """``oci:DIR[:TAG]`` (the tag is what follows the first colon, as in containers/image) or ``dir:DIR``."""
    transport, sep, rest = text.partition(":")
    if not sep or not rest:
        raise DestinationError(f"{text!r}: expected oci:DIR[:TAG] or dir:DIR")
    if transport == "oci":
        path, _, tag = rest.partition(":")
        if not path:
            raise DestinationError(f"{text!r}: the OCI layout directory is missing")
        return OciLayoutDestination(Path(path), tag or None)
    if transport == "dir":
        return DirDestination(Path(rest))
    raise DestinationError(f"{text!r}: cannot copy to the {transport}: transport (use oci:DIR[:TAG] or dir:DIR)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _file_has(path: Path, blob: BlobDescriptor) -> bool:
    """Whether ``path`` is a regular file holding exactly ``blob`` (size, then digest)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size != blob.size:
            return False
        algorithm = blob.digest.split(":", 1)[0]
        hasher = hashlib.new(algorithm)
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    return f"{algorithm}:{hasher.hexdigest()}" == blob.digest


class BlobFile:
    """One attempt at a blob: a temporary file beside ``final``, renamed into place by ``commit``."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.partial-{secrets.token_hex(4)}")
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def fileno(self) -> int:
        """The temporary file's fd, for splice(2) (``protocol.client.pull``)."""
        assert self._fd is not None
        return self._fd

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]

    async def commit(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None

        def durable() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)

        await trio.to_thread.run_sync(durable)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


async def _existing_or_new(path: Path, blob: BlobDescriptor) -> BlobFile | None:
    if await trio.to_thread.run_sync(_file_has, path, blob):
        return None
    return BlobFile(path)


class OciLayoutDestination:
    """An OCI image layout: ``oci-layout``, ``index.json``, ``blobs/<algorithm>/<hex>``. An existing layout is
    added to (an entry with the same tag is replaced, as skopeo does); any other non-empty directory is refused."""

    def __init__(self, path: Path, tag: str | None) -> None:
        self.path = path
        self.tag = tag
        self.description = f"oci:{path}" + (f":{tag}" if tag else "")

    async def prepare(self) -> None:
        def run() -> None:
            layout = self.path / "oci-layout"
            if self.path.exists():
                if not self.path.is_dir():
                    raise DestinationError(f"{self.path}: exists and is not a directory")
                if any(self.path.iterdir()) and not layout.is_file():
                    raise DestinationError(f"{self.path}: not empty and not an OCI layout (no oci-layout file)")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "blobs").mkdir(exist_ok=True)
            if not layout.is_file():
                _write_atomically(layout, b'{"imageLayoutVersion":"1.0.0"}')

        await trio.to_thread.run_sync(run)

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.path / "blobs" / algorithm / hexpart

    async def sink(self, blob: BlobDescriptor) -> BlobFile | None:
        path = self._blob_path(blob.digest)
        path.parent.mkdir(exist_ok=True)
        return await _existing_or_new(path, blob)

    async def finish(self, image: PulledImage) -> None:
        def run() -> None:
            manifest_path = self._blob_path(image.stored_manifest_digest)
            manifest_path.parent.mkdir(exist_ok=True)
            _write_atomically(manifest_path, image.manifest)
            index_path = self.path / "index.json"
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            if index_path.exists():
                try:
                    index = json.loads(index_path.read_bytes())
                    if not isinstance(index.get("manifests"), list):
                        raise ValueError("no manifests array")
                except ValueError as e:
                    raise DestinationError(f"{index_path}: not an OCI index: {e}") from None
            entry: dict = {
                "mediaType": OCI_MANIFEST,
                "digest": image.stored_manifest_digest,
                "size": len(image.manifest),
            }
            annotations = {}
            if self.tag:
                annotations[REF_NAME] = self.tag
            if image.converted:
                annotations[SOURCE_DIGEST] = image.manifest_digest
            if annotations:
                entry["annotations"] = annotations
            kept = [
                m
                for m in index["manifests"]
                if not (isinstance(m, dict) and self.tag and (m.get("annotations") or {}).get(REF_NAME) == self.tag)
            ]
            index["manifests"] = [*kept, entry]
            _write_atomically(index_path, json.dumps(index, separators=(",", ":")).encode())

        await trio.to_thread.run_sync(run)


class DirDestination:
    """skopeo's ``dir:`` layout: ``manifest.json``, ``version``, one file per blob named by its hex digest
    (``sha512-<hex>`` for sha512). The directory must be empty, new, or an earlier ``dir:`` copy (whose
    ``manifest.json`` and ``version`` are replaced; its other blobs are left)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"dir:{path}"

    async def prepare(self) -> None:
        def run() -> None:
            if self.path.exists():
                if not self.path.is_dir():
                    raise DestinationError(f"{self.path}: exists and is not a directory")
                if any(self.path.iterdir()) and not (self.path / "version").is_file():
                    raise DestinationError(f"{self.path}: not empty and not a dir: layout (no version file)")
            self.path.mkdir(parents=True, exist_ok=True)

        await trio.to_thread.run_sync(run)

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.path / (hexpart if algorithm == "sha256" else f"{algorithm}-{hexpart}")

    async def sink(self, blob: BlobDescriptor) -> BlobFile | None:
        return await _existing_or_new(self._blob_path(blob.digest), blob)

    async def finish(self, image: PulledImage) -> None:
        def run() -> None:
            _write_atomically(self.path / "manifest.json", image.manifest)
            _write_atomically(self.path / "version", DIR_VERSION)

        await trio.to_thread.run_sync(run)


__all__ = [
    "BlobFile",
    "Destination",
    "DestinationError",
    "DirDestination",
    "OciLayoutDestination",
    "parse_destination",
]
