"""The ``dir:`` transport: skopeo's directory format.

``manifest.json`` (the image's manifest, possibly a list), ``<hex>.manifest.json`` for list
instances, blobs named by their digest's hex (``<hex>.tar`` in very old copies), ``version``.
"""

from __future__ import annotations

import os

from proxy.common import threads
from proxy.image import manifest
from proxy.image.gojson import go_quote
from proxy.sources.base import Blob, BlobNotFound, ImageSource, SourceError, SourceOptions
from proxy.sources.oci_layout import MAX_JSON_SIZE, DirFiles, open_local_dir, os_error_text

VERSION_PREFIX = "Directory Transport Version: "


class DirSource(ImageSource):
    stores_signatures = True

    def __init__(self, reference: str, files: DirFiles) -> None:
        self.reference = reference
        self.files = files
        self.root = files.where
        self.local_path = files.real_path

    def _hex(self, digest: str) -> str:
        if not manifest.is_valid_digest(digest):
            raise SourceError(f"{self.reference}: unexpected digest reference {go_quote(digest)}")
        return digest.partition(":")[2]

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        name = "manifest.json" if instance_digest is None else self._hex(instance_digest) + ".manifest.json"
        try:
            raw = await threads.run_sync(self.files.read, name, MAX_JSON_SIZE)
        except OSError as e:
            raise SourceError(f"{self.reference}: {os_error_text(e)}") from None
        return raw, manifest.guess_mime_type(raw)

    def read_file(self, name: str, limit: int) -> bytes:
        """A small file of the directory (a ``signature-N``), as the client (synchronous)."""
        return self.files.read(name, limit)

    async def open_blob(self, digest: str, expected_size: int | None = None) -> Blob:
        hex_ = self._hex(digest)
        for name in (hex_, hex_ + ".tar"):
            try:
                return await threads.run_sync(self.files.open_blob, name)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise SourceError(f"{self.reference}: opening blob {digest}: {os_error_text(e)}") from None
        raise BlobNotFound(f"{self.reference}: blob {digest} not found")

    async def aclose(self) -> None:
        self.files.close()


def _open(reference: str, path: str, options: SourceOptions) -> DirFiles:
    files = open_local_dir(reference, path, options, f"{path} is not a directory")
    try:
        version_path = os.path.join(path, "version")
        try:
            version = files.read("version", 4096).decode("utf-8", "replace")
        except FileNotFoundError:
            return files  # c/image's source does not require it
        except OSError as e:
            raise SourceError(f"{reference}: {os_error_text(e)}") from None
        if not version.startswith(VERSION_PREFIX):
            raise SourceError(f"{reference}: {version_path} is not a dir: transport version file")
    except BaseException:
        files.close()
        raise
    return files


async def open_dir(reference: str, path: str, options: SourceOptions) -> DirSource:
    """Open ``dir:PATH`` (``path`` is everything after ``dir:``)."""
    if not path:
        raise SourceError(f"{reference}: no path given")
    files = await threads.run_sync(_open, reference, path, options)
    return DirSource(reference, files)


__all__ = ["DirSource", "open_dir"]
