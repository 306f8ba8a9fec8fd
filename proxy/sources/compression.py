"""The compressions an archive or a docker-archive layer may use: detected by their magic bytes, read through a
synchronous decompressing file object."""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from typing import Any

import zstandard

_MAGIC = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

#: what decompressors raise on corrupt input (OSError covers gzip.BadGzipFile)
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def detect_compression(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def decompressing_reader(raw: Any, algorithm: str) -> Any:
    """A synchronous file object yielding the decompressed bytes of ``raw`` (each ``read(n)`` at most n bytes)."""
    if algorithm == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if algorithm == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if algorithm == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    if algorithm == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    raise ValueError(f"unknown compression {algorithm}")


__all__ = ["DECOMPRESSION_ERRORS", "decompressing_reader", "detect_compression"]
