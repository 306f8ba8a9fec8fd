"""Archive transports: ``oci-archive:`` (an OCI layout in a tar) and ``docker-archive:`` (``docker save``
output), both read in place, never unpacked (``proxy.sources.tar_index``: the index, its rules and caps).

- Opening an archive is indexing it (a compressed one is first decompressed into a private, capped, unnamed
  temporary file), in a cancellable worker thread, with the archive opened as the client; ``local_path`` is
  the file the kernel opened, for policy scopes.
- oci-archive: the index holds ``oci-layout``, ``index.json`` and ``blobs/<algo>/<encoded>`` only, and serves
  them to ``OCILayoutSource`` as its ``LayoutFiles``. Symbolic links are refused.
- docker-archive, like c/image's docker/tarfile source: the index holds ``manifest.json``, then the config and
  layers it names (a symlink among those is followed once, inside the archive). The schema2 manifest is
  generated from manifest.json and the config (layers named by their diffIDs, sizes of the uncompressed
  layers); layer blobs are served from the member's offset, decompressed on the fly when the member is
  compressed, so that their bytes match the diffID. Learning the size of a compressed layer decompresses it
  once (counted, never stored; cancellable, capped like an archive).

Before the signature policy is consulted, only the index and the JSON members that make the manifest are read
(index.json and manifests; manifest.json and the config, plus the first bytes of each docker-archive layer to
tell whether it is compressed, and a compressed one's size); blobs are served only after.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import trio

from proxy.common import threads
from proxy.image import gojson, manifest
from proxy.image.gojson import (
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
from proxy.image.reference import normalize_docker_reference
from proxy.sources import tar_index
from proxy.sources.base import Blob, BlobNotFound, BytesBlob, ImageSource, SourceError, SourceOptions
from proxy.sources.oci_layout import (
    MAX_JSON_SIZE,
    FileSection,
    OCILayoutSource,
    StreamBlob,
    os_error_text,
    parse_source_index,
    split_path_and_image,
)
from proxy.sources.tar_index import (
    DECOMPRESSION_ERRORS,
    ArchiveError,
    CancelFlag,
    TarIndex,
    clean_name,
    decompressing_reader,
    detect_compression,
    open_tar,
    run_cancellable,
)

_CHUNK = 1024 * 1024
MAX_TAR_JSON = MAX_JSON_SIZE

# ---- oci-archive ----------------------------------------------------------------------------

#: what an OCI layout reads: blobs/<algorithm>/<encoded> (the OCI digest grammar)
_OCI_BLOB = re.compile(r"blobs/[a-z0-9]+(?:[+._-][a-z0-9]+)*/[a-zA-Z0-9=_-]+")


def _oci_member(name: str) -> bool:
    return name in ("index.json", "oci-layout") or _OCI_BLOB.fullmatch(name) is not None


async def open_oci_archive(reference: str, within: str, options: SourceOptions) -> OCILayoutSource:
    """Open ``oci-archive:PATH[:IMAGE]``: an OCI layout whose files are the archive's indexed members."""
    path, image = split_path_and_image(within)
    if not path:
        raise SourceError(f"{reference}: no path given")

    def index(flag: CancelFlag) -> TarIndex:
        return open_tar(path, options.identity, options.tmpdir, _oci_member, False, False, flag)

    try:
        files = await run_cancellable(index, TarIndex.close)
    except FileNotFoundError:
        raise SourceError(f'{reference}: creating temp directory: archive file not found: "{path}"') from None
    except OSError as e:
        raise SourceError(f"{reference}: {os_error_text(e)}") from None
    except ArchiveError as e:
        raise SourceError(f"{reference}: {e}") from None
    return await OCILayoutSource.open_files(reference, files, image)


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
class _Layer:
    member: tuple[int, int]  # (offset, size) in the index's file
    compression: str | None
    size: int  # of the uncompressed stream, as served


def _find(index: TarIndex, component: str) -> tuple[int, int]:
    """c/image ``openTarComponent``: one symlink followed, then a regular file required."""
    name = clean_name(component)
    if name is not None and name in index.links:
        target = index.links[name]
        if target in index.links:
            raise OSError(f"Error reading tar archive component {go_quote(target)}: not a regular file")
        name = target
    return index.member(name if name is not None else component)


def _index_components(index: TarIndex, components: list[str], flag: CancelFlag) -> None:
    """Index the members ``components`` name, then the targets of those that are symlinks."""
    names = {n for n in map(clean_name, components) if n}
    names -= index.files.keys() | index.links.keys()
    if names:
        index.index(names.__contains__, True, flag)
    targets = {index.links[n] for n in map(clean_name, components) if n in index.links}
    targets -= index.files.keys() | index.links.keys()
    if targets:
        index.index(targets.__contains__, True, flag)


def _read_component(index: TarIndex, component: str) -> bytes:
    return index.read_member(_find(index, component), component, MAX_TAR_JSON)


def _layer_info(reference: str, index: TarIndex, member: tuple[int, int], name: str, flag: CancelFlag) -> _Layer:
    blob = index.open_member(member)
    try:
        compression = detect_compression(blob.read_sync(8))
    finally:
        blob.close_sync()
    if compression is None:
        return _Layer(member, None, member[1])
    blob = index.open_member(member)
    try:
        reader = decompressing_reader(FileSection(blob), compression)
        try:
            total = 0
            while chunk := reader.read(_CHUNK):
                total += len(chunk)
                if total > tar_index.MAX_DECOMPRESSED_SIZE:
                    raise SourceError(
                        f"{reference}: layer {go_quote(name)} decompresses to more than "
                        f"{tar_index.MAX_DECOMPRESSED_SIZE} bytes (MAX_DECOMPRESSED_SIZE); refused"
                    )
                flag.check()
        finally:
            reader.close()
        return _Layer(member, compression, total)
    finally:
        blob.close_sync()


@attrs.frozen
class _Image:
    manifest: bytes
    config: bytes
    config_digest: str
    layers: dict[str, _Layer]  # by diffID


def _manifest_items(reference: str, index: TarIndex, flag: CancelFlag) -> list[dict[str, Any]]:
    def fail(text: str) -> SourceError:
        return SourceError(f"{reference}: {text}")

    _index_components(index, ["manifest.json"], flag)
    try:
        items = gojson.unmarshal(_read_component(index, "manifest.json"), ListOf(_MANIFEST_ITEM)) or []
    except FileNotFoundError:
        raise fail('loading tar component "manifest.json": file does not exist') from None
    except OSError as e:
        raise fail(f'loading tar component "manifest.json": {os_error_text(e)}') from None
    except GoJSONError as e:
        raise fail(f"decoding tar manifest.json: {e}") from None
    return items


def _choose_item(reference: str, items: list[dict[str, Any]], tag: str | None, source_index: int) -> dict[str, Any]:
    """The manifest.json item the reference names (by tag, ``@N``, or the only one)."""

    def fail(text: str) -> SourceError:
        return SourceError(f"{reference}: {text}")

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
    return item


def _load_image(reference: str, index: TarIndex, item: dict[str, Any], flag: CancelFlag) -> _Image:
    """The image of one manifest.json item: its config, and each layer's size (which may mean decompressing it)."""

    def fail(text: str) -> SourceError:
        return SourceError(f"{reference}: {text}")

    _index_components(index, [item["Config"], *(item["Layers"] or [])], flag)  # what this image reads, only

    try:
        config = _read_component(index, item["Config"])
    except OSError as e:
        raise fail(f"loading tar component {go_quote(item['Config'])}: {os_error_text(e)}") from None
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
        clean = clean_name(layer_path) or layer_path
        if clean in used_paths:
            raise fail(f"Layer tarfile {go_quote(clean)} used for two different DiffID values")
        used_paths.add(clean)
        try:
            member = _find(index, clean)
        except FileNotFoundError:
            raise fail("Some layer tarfiles are missing in the tarball") from None
        except OSError as e:
            raise fail(str(e)) from None
        try:
            layers[diff_id] = _layer_info(reference, index, member, clean, flag)
        except DECOMPRESSION_ERRORS as e:
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
    """A ``docker save`` archive, read in place. Opening reads its headers and ``manifest.json`` only; the image
    (its config and each layer's size, which may mean decompressing a layer once to count it) is loaded on the
    first manifest or blob asked for, so the signature policy, which needs none of it for an archive (archives
    store no signatures), is consulted before any of it is read."""

    def __init__(self, reference: str, index: TarIndex, item: dict[str, Any]) -> None:
        self.reference = reference
        self.local_path = index.real_path
        self._index = index
        self._item = item
        self._image_or_none: _Image | None = None
        self._loading = trio.Lock()

    async def _loaded(self) -> _Image:
        async with self._loading:  # only a worker thread runs under it, with its own cancellation
            if self._image_or_none is None:

                def load(flag: CancelFlag) -> _Image:
                    return _load_image(self.reference, self._index, self._item, flag)

                try:
                    self._image_or_none = await run_cancellable(load, lambda _image: None)
                except ArchiveError as e:
                    raise SourceError(f"{self.reference}: {e}") from None
                except OSError as e:
                    raise SourceError(f"{self.reference}: reading the archive: {os_error_text(e)}") from None
            return self._image_or_none

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        image = await self._loaded()
        if instance_digest is not None and instance_digest != manifest.manifest_digest(image.manifest):
            raise SourceError(f'{self.reference}: Manifest lists are not supported by "docker-archive:"')
        return image.manifest, manifest.DOCKER_V2S2

    async def open_blob(self, digest: str, expected_size: int | None = None) -> Blob:
        image = await self._loaded()
        if digest == image.config_digest:
            return BytesBlob(image.config)
        layer = image.layers.get(digest)
        if layer is None:
            raise BlobNotFound(f"{self.reference}: Unknown blob {digest}")
        try:
            blob = await threads.run_sync(self._index.open_member, layer.member)
        except (OSError, ValueError) as e:
            raise SourceError(f"{self.reference}: opening blob {digest}: {e}") from None
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
        self._index.close()


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


async def open_docker_archive(reference: str, within: str, options: SourceOptions) -> DockerArchiveSource:
    """Open ``docker-archive:PATH[:NAME:TAG|:@N]``."""
    path, tag, source_index = _parse_docker_archive_ref(reference, within)

    def load(flag: CancelFlag) -> tuple[TarIndex, dict[str, Any]]:
        index = open_tar(path, options.identity, options.tmpdir, "manifest.json".__eq__, True, True, flag)
        try:
            items = _manifest_items(reference, index, flag)
            return index, _choose_item(reference, items, tag, source_index)
        except BaseException:
            index.close()
            raise

    try:
        index, item = await run_cancellable(load, lambda loaded: loaded[0].close())
    except OSError as e:
        raise SourceError(f"{reference}: opening file {go_quote(path)}: {os_error_text(e)}") from None
    except ArchiveError as e:
        raise SourceError(f"{reference}: {e}") from None
    return DockerArchiveSource(reference, index, item)


__all__ = [
    "DockerArchiveSource",
    "detect_compression",
    "open_docker_archive",
    "open_oci_archive",
]
