"""The ``oci:`` transport (an OCI image layout directory), and the file helpers other local
transports share: confined opening of files and blobs read with ``pread`` off the trio thread.
"""

from __future__ import annotations

import abc
import io
import os
import re
from collections.abc import Callable
from typing import Any

from proxy.common import threads
from proxy.image import gojson, manifest
from proxy.image.gojson import GoJSONError, go_quote
from proxy.sources.base import Blob, BlobNotFound, FileWindow, ImageNotFound, ImageSource, SourceError, SourceOptions
from proxy.sources.localfs import LocalDir, LocalPathError

#: largest JSON document (index.json, manifest) read into memory
MAX_JSON_SIZE = 16 * 1024 * 1024

_CHUNK = 1024 * 1024

# oci/internal ValidateImageName: an image name annotation as the OCI spec allows it
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_IMAGE_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


# ---- confined file access ----------------------------------------------------------------


def parse_source_index(reference: str, text: str) -> int:
    """The ``@N`` image index of ``oci:`` and ``docker-archive:`` references (c/image's texts)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise SourceError(f"{reference}: Invalid source index @{text}: not an integer")
    n = int(text)
    if n < 0:
        raise SourceError(f"{reference}: Invalid source index @{n}: must not be negative")
    return n


def os_error_text(e: OSError) -> str:
    """Go-like text for a failed file operation: ``open PATH: no such file or directory``."""
    if isinstance(e, LocalPathError):
        return str(e)
    reason = (e.strerror or str(e)).lower()
    return f"open {e.filename}: {reason}" if e.filename else reason


class FileBlob(Blob):
    """``length`` bytes of an open file from ``offset``, read with pread in a worker thread."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd: int | None = fd
        self._pos = offset
        self._end = offset + length
        self.size = length

    def window(self) -> FileWindow:
        """The blob's unread bytes in its file (the fd stays this blob's, closed with it)."""
        if self._fd is None:
            raise ValueError("blob is closed")
        return FileWindow(self._fd, self._pos, self._end - self._pos)

    def read_sync(self, max_bytes: int) -> bytes:
        if self._fd is None:
            raise ValueError("blob is closed")
        n = min(max_bytes, self._end - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        if not data:
            self._end = self._pos  # the file shrank under us: end here, verification will tell
        return data

    async def read(self, max_bytes: int) -> bytes:
        return await threads.run_sync(self.read_sync, max_bytes)

    def read_into_sync(self, buffer: memoryview) -> int:
        if self._fd is None:
            raise ValueError("blob is closed")
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        count = os.preadv(self._fd, [buffer[:n]], self._pos)
        self._pos += count
        if not count:
            self._end = self._pos  # the file shrank under us: end here, verification will tell
        return count

    async def read_into(self, buffer: memoryview) -> int:
        # never abandoned: the thread writes into the caller's buffer
        return await threads.run_sync(self.read_into_sync, buffer)

    def close_sync(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def aclose(self) -> None:
        self.close_sync()


class FileSection(io.RawIOBase):
    """A FileBlob as a synchronous file object (for decompressors)."""

    def __init__(self, blob: FileBlob) -> None:
        self._blob = blob

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._blob.read_sync(len(b))
        b[: len(data)] = data
        return len(data)


class StreamBlob(Blob):
    """A blob produced by a synchronous reader (e.g. a decompressor), read in a worker thread."""

    def __init__(self, reader: Any, size: int, close: Callable[[], None]) -> None:
        self._reader = reader
        self._close = close
        self.size = size

    async def read(self, max_bytes: int) -> bytes:
        return await threads.run_sync(self._reader.read, max_bytes)

    async def aclose(self) -> None:
        self._close()


class LayoutFiles(abc.ABC):
    """Where an OCI layout's files are: a directory (``DirFiles``) or an archive's index. Synchronous: called in
    worker threads. Errors are OSErrors naming the file (FileNotFoundError when absent)."""

    #: what the layout is, for messages
    where: str
    #: the resolved path of what was opened, for signature policy scopes
    real_path: str

    @abc.abstractmethod
    def read(self, relative: str, limit: int) -> bytes:
        """The whole file at ``relative`` (a slash-separated path inside the layout), at most ``limit`` bytes."""

    @abc.abstractmethod
    def open_blob(self, relative: str) -> FileBlob:
        """The file at ``relative``, open for reading as a blob (owned by the caller)."""

    def close(self) -> None:  # noqa: B027 - some hold nothing
        """Release what the files hold (a directory fd, an archive)."""


class DirFiles(LayoutFiles):
    """Files of a directory a client named, opened as that client (``proxy.sources.localfs``)."""

    def __init__(self, directory: LocalDir) -> None:
        self.directory = directory
        self.where = directory.path
        self.real_path = directory.real_path

    def read(self, relative: str, limit: int) -> bytes:
        return self.directory.read(relative, limit)

    def open_blob(self, relative: str) -> FileBlob:
        fd, st = self.directory.open(relative)
        return FileBlob(fd, 0, st.st_size)

    def close(self) -> None:
        self.directory.close()


# ---- the oci: transport ------------------------------------------------------------------


def split_path_and_image(reference: str) -> tuple[str, str]:
    """c/image ``SplitPathAndImage``: split at the first ':'."""
    path, _, image = reference.partition(":")
    return path, image


class OCILayoutSource(ImageSource):
    """An image in an OCI layout, chosen by tag, ``@N`` (index position) or ``@sha256:...``.

    The layout's files come from ``files`` (a directory, or an archive's index); blobs from ``blob_files``
    (the same, or ``--shared-blob-dir``, whose ``<algo>/<hex>`` files stand for ``blobs/<algo>/<hex>``)."""

    def __init__(
        self,
        reference: str,
        files: LayoutFiles,
        descriptor: dict[str, Any],
        index: dict[str, Any],
        blob_files: LayoutFiles | None = None,
    ) -> None:
        self.reference = reference
        self.files = files
        self.root = files.where
        self.local_path = files.real_path
        self._descriptor = descriptor
        self._index = index
        self._blob_files = blob_files
        self._blob_prefix = "" if blob_files is not None else "blobs/"

    @classmethod
    async def open_files(
        cls, reference: str, files: LayoutFiles, image: str, blob_files: LayoutFiles | None = None
    ) -> OCILayoutSource:
        """The image ``image`` (tag, ``@N``, ``@digest`` or empty) of the layout in ``files``; the files are the
        source's from then on (closed with it, or here on failure)."""
        try:
            index = await threads.run_sync(_read_index, reference, files)
            descriptor = _choose_descriptor(reference, index, image)
        except BaseException:
            files.close()
            if blob_files is not None:
                blob_files.close()
            raise
        return cls(reference, files, descriptor, index, blob_files)

    def _blob_path(self, digest: str) -> str:
        if not manifest.is_valid_digest(digest):
            raise SourceError(f"{self.reference}: unexpected digest reference {go_quote(digest)}")
        algo, _, hex_ = digest.partition(":")
        return f"{self._blob_prefix}{algo}/{hex_}"

    @property
    def _blobs(self) -> LayoutFiles:
        return self._blob_files if self._blob_files is not None else self.files

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        if instance_digest is None:
            digest, mime = self._descriptor["digest"], self._descriptor["mediaType"]
        else:
            digest, mime = instance_digest, ""
            for d in self._index["manifests"] or []:
                if d["digest"] == digest:
                    mime = d["mediaType"]
                    break
        path = self._blob_path(digest)
        try:
            raw = await threads.run_sync(self._blobs.read, path, MAX_JSON_SIZE)
        except FileNotFoundError as e:
            raise SourceError(f"{self.reference}: manifest {digest} not found: {os_error_text(e)}") from None
        except OSError as e:
            raise SourceError(f"{self.reference}: reading manifest {digest}: {os_error_text(e)}") from None
        return raw, mime or manifest.guess_mime_type(raw)

    async def open_blob(self, digest: str, expected_size: int | None = None) -> Blob:
        path = self._blob_path(digest)
        try:
            return await threads.run_sync(self._blobs.open_blob, path)
        except FileNotFoundError:
            raise BlobNotFound(f"{self.reference}: blob {digest} not found") from None
        except OSError as e:
            raise SourceError(f"{self.reference}: opening blob {digest}: {os_error_text(e)}") from None

    async def aclose(self) -> None:
        self.files.close()
        if self._blob_files is not None:
            self._blob_files.close()


def _read_index(reference: str, files: LayoutFiles) -> dict[str, Any]:
    try:
        raw = files.read("index.json", MAX_JSON_SIZE)
    except OSError as e:
        raise SourceError(f"{reference}: {os_error_text(e)}") from None
    try:
        return gojson.unmarshal(raw, manifest.OCI_INDEX_STRUCT)
    except GoJSONError as e:
        raise SourceError(f"{reference}: parsing {os.path.join(files.where, 'index.json')}: {e}") from None


_LOOKUP_TYPES = (manifest.OCI_MANIFEST, manifest.OCI_INDEX, manifest.DOCKER_V2S2, manifest.DOCKER_V2_LIST)


def _choose_descriptor(reference: str, index: dict[str, Any], image: str) -> dict[str, Any]:
    """c/image ``getManifestDescriptor`` (plus ``@sha256:...`` to name a manifest by digest)."""
    entries = index["manifests"] or []
    if image.startswith("@") and manifest.is_valid_digest(image[1:]):
        found = [d for d in entries if d["digest"] == image[1:]]
        if not found:
            raise ImageNotFound(f"{reference}: no descriptor found for digest {image[1:]}")
        return _checked(reference, found[0])
    if image.startswith("@"):
        n = parse_source_index(reference, image[1:])
        if n >= len(entries):
            raise SourceError(f"{reference}: index {n} is too large, only {len(entries)} entries available")
        return _checked(reference, entries[n])
    if image:
        if not _IMAGE_NAME_RE.fullmatch(image):
            raise SourceError(f"{reference}: Invalid image {image}")
        unsupported = []
        for d in entries:
            if (d["annotations"] or {}).get(manifest.ANNOTATION_REF_NAME) == image:
                if d["mediaType"] in _LOOKUP_TYPES:
                    return _checked(reference, d)
                unsupported.append(d["mediaType"])
        if unsupported:
            listed = " ".join(go_quote(m) for m in unsupported)
            raise SourceError(
                f"{reference}: reference {go_quote(image)} matches unsupported manifest MIME types [{listed}]"
            )
        raise ImageNotFound(f"{reference}: no descriptor found for reference {go_quote(image)}")
    if len(entries) != 1:
        raise SourceError(f"{reference}: more than one image in oci, choose an image")
    return _checked(reference, entries[0])


def _checked(reference: str, d: dict[str, Any]) -> dict[str, Any]:
    if not manifest.is_valid_digest(d["digest"]):
        raise SourceError(f"{reference}: invalid digest {go_quote(d['digest'])} in index.json")
    return d


def open_local_dir(reference: str, path: str, options: SourceOptions, missing: str | None = None) -> DirFiles:
    """A client-named directory, opened as the client (synchronous; SourceError naming it, with ``missing`` as
    the text when it does not exist or is not a directory)."""
    try:
        return DirFiles(LocalDir(path, options.identity))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise SourceError(f"{reference}: {missing or os_error_text(e)}") from None
    except OSError as e:
        raise SourceError(f"{reference}: {os_error_text(e)}") from None


def _open_layout_dirs(reference: str, path: str, options: SourceOptions) -> tuple[DirFiles, DirFiles | None]:
    # c/image finds no index.json there
    files = open_local_dir(
        reference, path, options, f"open {os.path.join(path, 'index.json')}: no such file or directory"
    )
    if options.shared_blob_dir is None:
        return files, None
    try:
        return files, open_local_dir(reference, options.shared_blob_dir, options)
    except BaseException:
        files.close()
        raise


async def open_oci_layout(reference: str, within: str, options: SourceOptions) -> OCILayoutSource:
    """Open ``oci:PATH[:IMAGE]`` (``within`` is what follows ``oci:``)."""
    path, image = split_path_and_image(within)
    if not path:
        raise SourceError(f"{reference}: no path given")
    files, blob_files = await threads.run_sync(_open_layout_dirs, reference, path, options)
    return await OCILayoutSource.open_files(reference, files, image, blob_files)


__all__ = [
    "DirFiles",
    "FileBlob",
    "FileSection",
    "LayoutFiles",
    "OCILayoutSource",
    "StreamBlob",
    "open_local_dir",
    "open_oci_layout",
    "os_error_text",
    "split_path_and_image",
]
