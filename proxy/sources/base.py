"""What every transport (oci:, oci-archive:, docker-archive:, dir:, later docker://) provides.

A source is opened once per OpenImage and closed by CloseImage or at session end. It hands out
manifests by digest and blobs as async byte streams; it never verifies (the handler and the blob
producers do that) and never resolves manifest lists (``proxy.image.manifest`` does).
"""

from __future__ import annotations

import abc

import attrs

from protocol.errors import ErrorCode, ProxyError
from proxy.sources.localfs import Identity


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


class Blob(abc.ABC):
    """An open blob: read it in chunks until ``b""``, then close it."""

    size: int  # as the source knows it, -1 when unknown
    #: True when the blob itself refuses to end (raises instead of returning ``b""``) unless every byte it gave
    #: matched its digest, as a reader of a blob-cache download does: producers need not hash it a second time
    verifies_digest: bool = False

    @abc.abstractmethod
    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at the end of the blob."""

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

    @abc.abstractmethod
    async def open_blob(self, digest: str) -> Blob:
        """Open the blob with that (already validated) digest; BlobNotFound if absent."""

    async def aclose(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release what the source holds (temporary directories, connections)."""


__all__ = [
    "Blob",
    "BlobNotFound",
    "BytesBlob",
    "ErrorCode",
    "ImageNotFound",
    "ImageSource",
    "SourceError",
    "SourceOptions",
]
