"""Archive transports: ``oci-archive:`` (an OCI layout in a tar) and ``docker-archive:``
(``docker save`` output).

oci-archive is extracted (tarfile's "data" filter: nothing lands outside the temporary
directory) into a directory under ``options.tmpdir`` / ``$TMPDIR`` that ``aclose`` removes.
docker-archive is read in place like c/image's docker/tarfile source: the schema2 manifest is
generated from manifest.json and the config (layers named by their diffIDs, sizes of the
uncompressed layers), and layer blobs are served from the tar member's offset, decompressed on
the fly when the member is compressed, so that their bytes match the diffID.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
from typing import Any

import attrs
import trio
import zstandard

from proxy import gojson, manifest
from proxy.gojson import (
    ANY,
    STRING,
    TIME,
    Field,
    GoJSONError,
    ListOf,
    MapOf,
    PtrTo,
    Struct,
    go_quote,
)
from proxy.sources.base import Blob, BlobNotFound, BytesBlob, ImageSource, SourceError, SourceOptions
from proxy.sources.docker_reference import normalize_docker_reference
from proxy.sources.localfs import LocalDir
from proxy.sources.oci_layout import (
    DirFiles,
    FileBlob,
    FileSection,
    OCILayoutSource,
    StreamBlob,
    os_error_text,
    parse_source_index,
    split_path_and_image,
)

_CHUNK = 1024 * 1024
MAX_TAR_JSON = 16 * 1024 * 1024

# ---- compression ----------------------------------------------------------------------------

_MAGIC = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def detect_compression(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def decompressing_reader(raw: Any, algorithm: str) -> Any:
    """A synchronous file object yielding the decompressed bytes of ``raw``."""
    if algorithm == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if algorithm == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if algorithm == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    if algorithm == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    raise ValueError(f"unknown compression {algorithm}")


# ---- oci-archive ----------------------------------------------------------------------------


class OCIArchiveSource(ImageSource):
    """An OCI layout extracted from an archive into a private temporary directory."""

    def __init__(self, reference: str, layout: OCILayoutSource, tmpdir: str) -> None:
        self.reference = reference
        self._layout = layout
        self._tmpdir: str | None = tmpdir

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        return await self._layout.get_manifest(instance_digest)

    async def open_blob(self, digest: str) -> Blob:
        return await self._layout.open_blob(digest)

    async def aclose(self) -> None:
        if self._tmpdir is not None:
            tmp, self._tmpdir = self._tmpdir, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, tmp, True)


def _extract(reference: str, path: str, destination: str) -> None:
    try:
        with tarfile.open(path, "r:*") as tf:
            tf.extractall(destination, filter="data")
    except FileNotFoundError:
        raise SourceError(f'{reference}: creating temp directory: archive file not found: "{path}"') from None
    except (OSError, tarfile.TarError, EOFError, zstandard.ZstdError) as e:
        raise SourceError(f"{reference}: extracting {path}: {e}") from None


async def open_oci_archive(reference: str, within: str, options: SourceOptions) -> OCIArchiveSource:
    """Open ``oci-archive:PATH[:IMAGE]``."""
    path, image = split_path_and_image(within)
    if not path:
        raise SourceError(f"{reference}: no path given")
    if not os.path.exists(path):
        raise SourceError(f'{reference}: creating temp directory: archive file not found: "{path}"')
    try:
        tmp = tempfile.mkdtemp(prefix="oci-archive-", dir=options.tmpdir)
    except OSError as e:
        raise SourceError(f"{reference}: creating temp directory: {os_error_text(e)}") from None
    try:
        await trio.to_thread.run_sync(_extract, reference, path, tmp)
        files = await trio.to_thread.run_sync(DirFiles, LocalDir(tmp))
        layout = await OCILayoutSource.open_files(reference, files, image)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(shutil.rmtree, tmp, True)
        raise
    return OCIArchiveSource(reference, layout, tmp)


# ---- docker-archive: the archive ------------------------------------------------------------

_MANIFEST_ITEM = Struct(
    "ManifestItem",
    (
        Field("Config", STRING),
        Field("RepoTags", ListOf(STRING)),
        Field("Layers", ListOf(STRING)),
        Field("Parent", STRING),
        Field("LayerSources", MapOf(ANY)),
    ),
)
_SCHEMA2_IMAGE = Struct(  # the parts of manifest.Schema2Image whose types Go checks when decoding
    "Schema2Image",
    (
        Field("id", STRING),
        Field("parent", STRING),
        Field("comment", STRING),
        Field("created", TIME),
        Field("container", STRING),
        Field("docker_version", STRING),
        Field("author", STRING),
        Field("architecture", STRING),
        Field("variant", STRING),
        Field("os", STRING),
        Field("rootfs", PtrTo(Struct("Schema2RootFS", (Field("type", STRING), Field("diff_ids", ListOf(STRING)))))),
        Field(
            "history",
            ListOf(
                Struct(
                    "Schema2History",
                    (
                        Field("created", TIME),
                        Field("author", STRING),
                        Field("created_by", STRING),
                        Field("comment", STRING),
                    ),
                )
            ),
        ),
        Field("os.version", STRING),
        Field("os.features", ListOf(STRING)),
    ),
)


@attrs.frozen
class _Member:
    name: str
    offset: int
    size: int
    info: tarfile.TarInfo


@attrs.frozen
class _Layer:
    member: _Member
    compression: str | None
    size: int  # of the uncompressed stream, as served


class _TarIndex:
    """Member table of an uncompressed tar file, for random access by cleaned name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.members: dict[str, _Member] = {}
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                name = posixpath.normpath(info.name)
                if name not in self.members:
                    self.members[name] = _Member(name, info.offset_data, info.size, info)

    def find(self, component: str) -> _Member:
        """c/image ``openTarComponent``: one symlink followed, then a regular file required."""
        component = posixpath.normpath(component)
        m = self.members.get(component)
        if m is None:
            raise FileNotFoundError(component)
        if m.info.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(component), m.info.linkname))
            m = self.members.get(target)
            if m is None:
                raise FileNotFoundError(component)
        elif m.info.islnk():
            m = self.members.get(posixpath.normpath(m.info.linkname))
            if m is None:
                raise FileNotFoundError(component)
        if not m.info.isreg():
            raise OSError(f"Error reading tar archive component {go_quote(m.info.name)}: not a regular file")
        return m

    def open(self, member: _Member) -> FileBlob:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return FileBlob(fd, member.offset, member.size)

    def read(self, component: str, limit: int = MAX_TAR_JSON) -> bytes:
        m = self.find(component)
        if m.size > limit:
            raise OSError(f"tar component {go_quote(component)} is larger than {limit} bytes")
        blob = self.open(m)
        try:
            out = bytearray()
            while chunk := blob.read_sync(_CHUNK):
                out += chunk
            return bytes(out)
        finally:
            blob.close_sync()


def _layer_info(index: _TarIndex, member: _Member) -> _Layer:
    blob = index.open(member)
    try:
        compression = detect_compression(blob.read_sync(8))
    finally:
        blob.close_sync()
    if compression is None:
        return _Layer(member, None, member.size)
    blob = index.open(member)
    try:
        reader = decompressing_reader(FileSection(blob), compression)
        total = 0
        while chunk := reader.read(_CHUNK):
            total += len(chunk)
        return _Layer(member, compression, total)
    finally:
        blob.close_sync()


@attrs.frozen
class _Image:
    manifest: bytes
    config: bytes
    config_digest: str
    layers: dict[str, _Layer]  # by diffID


def _load_image(reference: str, index: _TarIndex, tag: str | None, source_index: int) -> _Image:
    def fail(text: str) -> SourceError:
        return SourceError(f"{reference}: {text}")

    try:
        items = gojson.unmarshal(index.read("manifest.json"), ListOf(_MANIFEST_ITEM)) or []
    except FileNotFoundError:
        raise fail('loading tar component "manifest.json": file does not exist') from None
    except GoJSONError as e:
        raise fail(f"decoding tar manifest.json: {e}") from None
    if tag is not None:
        item = None
        for i, it in enumerate(items):
            for t in it["RepoTags"] or []:
                try:
                    parsed = normalize_docker_reference(t, default_tag=False)
                except ValueError as e:
                    raise fail(f"Invalid tag {go_quote(t)} in manifest.json item @{i}: {e}") from None
                if parsed == tag:
                    item = it
                    break
            if item is not None:
                break
        if item is None:
            raise fail(f"Tag {go_quote(tag)} not found")
    elif source_index != -1:
        if source_index >= len(items):
            raise fail(f"Invalid source index @{source_index}, only {len(items)} manifest items available")
        item = items[source_index]
    else:
        if len(items) != 1:
            raise fail(f"Unexpected tar manifest.json: expected 1 item, got {len(items)}")
        item = items[0]

    try:
        config = index.read(item["Config"])
    except (OSError, ValueError) as e:
        raise fail(f"loading tar component {go_quote(item['Config'])}: {e}") from None
    try:
        parsed_config = gojson.unmarshal(config, _SCHEMA2_IMAGE)
    except GoJSONError as e:
        raise fail(f"decoding tar config {go_quote(item['Config'])}: {e}") from None
    rootfs = parsed_config["rootfs"]
    if rootfs is None:
        raise fail(f"Invalid image config (rootFS is not set): {go_quote(item['Config'])}")
    diff_ids = rootfs["diff_ids"] or []
    layer_paths = item["Layers"] or []
    if len(layer_paths) != len(diff_ids):
        raise fail(f"Inconsistent layer count: {len(layer_paths)} in manifest, {len(diff_ids)} in config")

    layers: dict[str, _Layer] = {}
    used_paths: set[str] = set()
    for diff_id, layer_path in zip(diff_ids, layer_paths, strict=True):
        if not manifest.is_valid_digest(diff_id):
            raise fail(f"invalid diffID {go_quote(diff_id)} in the image config")
        if diff_id in layers:
            continue  # the same layer twice (docker save links the duplicates)
        clean = posixpath.normpath(layer_path)
        if clean in used_paths:
            raise fail(f"Layer tarfile {go_quote(clean)} used for two different DiffID values")
        used_paths.add(clean)
        try:
            member = index.find(clean)
        except FileNotFoundError:
            raise fail("Some layer tarfiles are missing in the tarball") from None
        except OSError as e:
            raise fail(str(e)) from None
        try:
            layers[diff_id] = _layer_info(index, member)
        except (OSError, EOFError, zstandard.ZstdError, lzma.LZMAError) as e:
            raise fail(f"determining uncompressed size of {go_quote(clean)}: {e}") from None

    config_digest = manifest.digest_of(config)
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.DOCKER_V2S2,
        "config": {"mediaType": manifest.DOCKER_CONFIG, "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": manifest.DOCKER_LAYER_GZIP, "size": layers[d].size, "digest": d} for d in diff_ids],
    }
    return _Image(gojson.marshal(doc), config, config_digest, layers)


class DockerArchiveSource(ImageSource):
    def __init__(self, reference: str, index: _TarIndex, image: _Image, temp_file: str | None) -> None:
        self.reference = reference
        self._index = index
        self._image = image
        self._temp_file = temp_file

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        if instance_digest is not None and instance_digest != manifest.manifest_digest(self._image.manifest):
            raise SourceError(f'{self.reference}: Manifest lists are not supported by "docker-archive:"')
        return self._image.manifest, manifest.DOCKER_V2S2

    async def open_blob(self, digest: str) -> Blob:
        if digest == self._image.config_digest:
            return BytesBlob(self._image.config)
        layer = self._image.layers.get(digest)
        if layer is None:
            raise BlobNotFound(f"{self.reference}: Unknown blob {digest}")
        try:
            blob = await trio.to_thread.run_sync(self._index.open, layer.member)
        except OSError as e:
            raise SourceError(f"{self.reference}: opening blob {digest}: {os_error_text(e)}") from None
        if layer.compression is None:
            return blob
        reader = decompressing_reader(FileSection(blob), layer.compression)

        def close() -> None:
            try:
                reader.close()
            finally:
                blob.close_sync()

        return StreamBlob(reader, layer.size, close)

    async def aclose(self) -> None:
        if self._temp_file is not None:
            path, self._temp_file = self._temp_file, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove, path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _parse_docker_archive_ref(reference: str, within: str) -> tuple[str, str | None, int]:
    path, _, rest = within.partition(":")
    if not path:
        raise SourceError(f"{reference}: docker-archive reference {go_quote(within)} has no path")
    if not rest:
        return path, None, -1
    if rest.startswith("@"):
        return path, None, parse_source_index(reference, rest[1:])
    try:
        tag = normalize_docker_reference(rest)
    except ValueError as e:
        raise SourceError(f"{reference}: docker-archive parsing reference: {e}") from None
    if "@" in tag:
        raise SourceError(f"{reference}: reference does not include a tag: {tag}")
    return path, tag, -1


def _prepare(reference: str, path: str, tmpdir: str | None) -> tuple[_TarIndex, str | None]:
    """Index the archive; a compressed archive is first decompressed to a temporary file."""
    try:
        with open(path, "rb") as f:
            compression = detect_compression(f.read(8))
            if compression is None:
                return _TarIndex(path), None
            f.seek(0)
            fd, temp = tempfile.mkstemp(prefix="docker-tar", dir=tmpdir)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(decompressing_reader(f, compression), out, _CHUNK)
                return _TarIndex(temp), temp
            except BaseException:
                _remove(temp)
                raise
    except FileNotFoundError as e:
        raise SourceError(f"{reference}: opening file {go_quote(path)}: {os_error_text(e)}") from None
    except (OSError, EOFError, tarfile.TarError, zstandard.ZstdError, lzma.LZMAError) as e:
        raise SourceError(f"{reference}: reading archive {go_quote(path)}: {e}") from None


async def open_docker_archive(reference: str, within: str, options: SourceOptions) -> DockerArchiveSource:
    """Open ``docker-archive:PATH[:NAME:TAG|:@N]``."""
    path, tag, source_index = _parse_docker_archive_ref(reference, within)
    index, temp = await trio.to_thread.run_sync(_prepare, reference, path, options.tmpdir)
    try:
        image = await trio.to_thread.run_sync(_load_image, reference, index, tag, source_index)
    except BaseException:
        if temp is not None:
            _remove(temp)
        raise
    return DockerArchiveSource(reference, index, image, temp)


__all__ = [
    "DockerArchiveSource",
    "OCIArchiveSource",
    "detect_compression",
    "open_docker_archive",
    "open_oci_archive",
]
