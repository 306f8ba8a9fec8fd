"""What every transport (oci:, oci-archive:, docker-archive:, dir:, later docker://) provides.

A source is opened once per OpenImage and closed by CloseImage or at session end. It hands out
manifests by digest and blobs as async byte streams; it never verifies (the handler and the blob
producers do that) and never resolves manifest lists (``proxy.image.manifest`` does).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.common.pipes import CHUNK_SIZE, splice_file, write_all
from proxy.sources.localfs import Identity

if TYPE_CHECKING:
    from proxy.server.metrics import Fetch


class SourceError(ProxyError):
    """A transport failed; the text names the image (and digest or path) concerned."""


class ImageNotFound(SourceError):
    """The image does not exist at the source: OpenImageOptional answers 0 for this."""


class BlobNotFound(SourceError):
    """The source has no blob with that digest."""


@attrs.frozen
class SourceOptions:
    """Settings from the command line that transports read."""

    tmpdir: str | None = None
    shared_blob_dir: str | None = None
    #: whose permissions local paths are opened with (a daemon's client); None: this process's own
    identity: Identity | None = None


@attrs.frozen
class FileWindow:
    """Where a blob's bytes lie in an open file: ``length`` bytes from ``offset`` of ``fd`` (the blob's own fd:
    valid while the blob is open)."""

    fd: int
    offset: int
    length: int
    #: the file is ours and its bytes are streamed once (a blob-cache file): dropped from the page cache behind
    read_once: bool = False


class Blob(abc.ABC):
    """An open blob: read it in chunks until ``b""``, then close it. Besides a stream, a blob says what else it can
    do, so that nobody asks what type it is:

    - ``verifies_digest``: it refuses to end (raises instead of returning ``b""``) unless every byte it gave
      matched its digest, as a blob-cache file checked when opened, or a reader of a cache download, do;
      producers need not hash it a second time, and ``send_to`` may move it without reading it.
    - ``window()``: its bytes are a section of a file, for readers that ``pread`` ranges of it or ``sendfile`` it.
    """

    size: int  # as the source knows it, -1 when unknown
    verifies_digest: bool = False
    #: where its bytes come from, for metrics, log lines and ``image-proxy status``: ``network`` (a registry, maybe
    #: through a cache download), ``cache`` (a verified blob-cache file) or ``local`` (a local image's file, memory)
    origin: str = "local"
    #: how its bytes come over the network (hosts, resumes), when they do (proxy.server.metrics.Fetch)
    fetch: Fetch | None = None

    @abc.abstractmethod
    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at the end of the blob."""

    async def read_into(self, buffer: memoryview) -> int:
        """Up to ``len(buffer)`` bytes into ``buffer``; 0 at the end of the blob. Blobs that can fill a buffer
        without an intermediate copy (a registry body) do."""
        chunk = await self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def window(self) -> FileWindow | None:
        """Where the blob's unread bytes lie in a file, or None for a stream."""
        return None

    async def send_to(self, writer: trio.lowlevel.FdStream, moved: Callable[[int], None] | None = None) -> int:
        """All of the blob into a pipe, the number of bytes sent; for a blob that ``verifies_digest`` (nothing
        checks these bytes on their way). By ``sendfile`` from its window when it has one, else read and write.
        ``moved`` is told each count of bytes sent (a transfer's progress)."""
        window = self.window()
        if window is not None:
            end = await splice_file(
                window.fd,
                window.offset + window.length,
                writer,
                start=window.offset,
                read_once=window.read_once,
                moved=moved,
            )
            return end - window.offset
        sent = 0
        while chunk := await self.read(CHUNK_SIZE):
            sent += len(chunk)
            await write_all(writer, chunk)
            if moved is not None:
                moved(len(chunk))
        return sent

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Blob:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class BytesBlob(Blob):
    """A blob already in memory (a config from an archive, a converted config)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.size = len(data)

    async def read(self, max_bytes: int) -> bytes:
        chunk = bytes(self._data[self._pos : self._pos + max_bytes])
        self._pos += len(chunk)
        return chunk

    async def aclose(self) -> None:
        pass


class ImageSource(abc.ABC):
    """One opened image reference."""

    #: the reference as the user wrote it, with its transport (for error texts)
    reference: str
    #: for local transports, the path the kernel opened (symlinks and ``..`` resolved): signature policy scopes
    #: are matched on it, never on the reference's text
    local_path: str | None = None
    #: whether signatures can be stored with the image (a registry's lookaside or attachments, ``dir:``'s
    #: signature files); for a source without, the signature policy decides before any manifest is read
    stores_signatures: bool = False

    @abc.abstractmethod
    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        """Raw manifest bytes and their MIME type.

        ``None`` is the manifest the reference names (possibly a list or an index);
        a digest names one instance of a list, or any manifest stored with the image.
        """

    #: where the cache keeps this source's blobs apart from other sources' (a registry's name); None: its blobs
    #: are files already, nothing to cache
    cache_key: str | None = None

    @abc.abstractmethod
    async def open_blob(self, digest: str, expected_size: int | None = None) -> Blob:
        """Open the blob with that (already validated) digest; BlobNotFound if absent. ``expected_size`` is what
        the asker expects (a hint: it is checked by the producer, not here)."""

    async def open_blob_from(self, digest: str, offset: int, end: int | None = None) -> Blob:
        """The blob from byte ``offset`` (to ``end``): for sources with a ``cache_key``, whose downloads resume."""
        raise NotImplementedError(f"{self.reference}: blobs cannot be read from an offset")

    async def cached_blob(self, digest: str, size: int | None) -> Blob | None:
        """The blob if a cache holds it verified (a ``CachingSource``), else None."""
        return None

    def ranged_source(self) -> ImageSource | None:
        """The source to send HTTP range requests to (a registry), or None: ranges are read from the blob."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release what the source holds (temporary directories, connections)."""


__all__ = [
    "Blob",
    "BlobNotFound",
    "BytesBlob",
    "ErrorCode",
    "FileWindow",
    "ImageNotFound",
    "ImageSource",
    "SourceError",
    "SourceOptions",
]
