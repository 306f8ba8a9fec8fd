"""The ``dir:`` transport: skopeo's directory format.

``manifest.json`` (the image's manifest, possibly a list), ``<hex>.manifest.json`` for list
instances, blobs named by their digest's hex (``<hex>.tar`` in very old copies), ``version``.
"""

from __future__ import annotations

import os

import trio

from proxy import manifest
from proxy.gojson import go_quote
from proxy.sources.base import Blob, BlobNotFound, ImageSource, SourceError, SourceOptions
from proxy.sources.oci_layout import open_file_blob, os_error_text, read_inside

VERSION_PREFIX = "Directory Transport Version: "


class DirSource(ImageSource):
    def __init__(self, reference: str, root: str) -> None:
        self.reference = reference
        self.root = root

    def _hex(self, digest: str) -> str:
        if not manifest.is_valid_digest(digest):
            raise SourceError(f"{self.reference}: unexpected digest reference {go_quote(digest)}")
        return digest.partition(":")[2]

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        name = "manifest.json" if instance_digest is None else self._hex(instance_digest) + ".manifest.json"
        path = os.path.join(self.root, name)
        try:
            raw = await trio.to_thread.run_sync(read_inside, self.root, path)
        except OSError as e:
            raise SourceError(f"{self.reference}: {os_error_text(e)}") from None
        return raw, manifest.guess_mime_type(raw)

    async def open_blob(self, digest: str) -> Blob:
        hex_ = self._hex(digest)
        for name in (hex_, hex_ + ".tar"):
            try:
                return await trio.to_thread.run_sync(open_file_blob, self.root, os.path.join(self.root, name))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise SourceError(f"{self.reference}: opening blob {digest}: {os_error_text(e)}") from None
        raise BlobNotFound(f"{self.reference}: blob {digest} not found")


def _check_dir(reference: str, path: str) -> None:
    if not os.path.isdir(path):
        raise SourceError(f"{reference}: {path} is not a directory")
    version_path = os.path.join(path, "version")
    try:
        version = read_inside(path, version_path, limit=4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return  # c/image's source does not require it
    except OSError as e:
        raise SourceError(f"{reference}: {os_error_text(e)}") from None
    if not version.startswith(VERSION_PREFIX):
        raise SourceError(f"{reference}: {version_path} is not a dir: transport version file")


async def open_dir(reference: str, path: str, options: SourceOptions) -> DirSource:
    """Open ``dir:PATH`` (``path`` is everything after ``dir:``)."""
    if not path:
        raise SourceError(f"{reference}: no path given")
    await trio.to_thread.run_sync(_check_dir, reference, path)
    return DirSource(reference, path)


__all__ = ["DirSource", "open_dir"]
