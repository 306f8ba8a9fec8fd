"""Builders of zstd:chunked and eStargz layers, per the format notes (docs in proxy/partial/toc.py).

Debian's skopeo 1.9.3 writes only the older zstd:chunked variant (40-byte footer, ``io.containers.`` annotations,
no tar-split): the tests use it as the real producer for that. The current variant (64-byte footer,
``io.github.containers.`` annotations, tar-split) and eStargz have no producer on the machine, so they are
built here, following containers/storage's and stargz-snapshotter's layouts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib

import attrs
import zstandard

SKIPPABLE = b"\x50\x2a\x4d\x18"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE + struct.pack("<I", len(payload)) + payload


@attrs.frozen
class Layer:
    blob: bytes
    annotations: dict[str, str]
    toc: bytes  # the TOC JSON the producer wrote
    tar_split: bytes | None = None  # decompressed
    media_type: str = "application/vnd.oci.image.layer.v1.tar+zstd"

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    def descriptor(self) -> dict:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.blob),
            "annotations": self.annotations,
        }


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 1_700_000_000
    return info.tobuf(format=tarfile.PAX_FORMAT)


def zstd_chunked(
    files: list[tuple[str, bytes]],
    *,
    footer: int = 64,
    annotate: bool = True,
    level: int = 1,
) -> Layer:
    """A zstd:chunked layer: each file's header and content in their own zstd frames, then the TOC, the
    tar-split (64-byte footer only) and the footer as skippable frames."""
    compressor = zstandard.ZstdCompressor(level=level)
    out = bytearray()
    entries = []
    split_lines = []
    position = 0
    for name, content in files:
        header = _tar_header(name, len(content))
        out += compressor.compress(header)
        split_lines.append({"type": 1, "payload": base64.b64encode(header).decode(), "position": position})
        position += 1
        start = len(out)
        padding = b"\0" * (-len(content) % 512)
        out += compressor.compress(content + padding)
        entries.append(
            {
                "type": "reg",
                "name": name,
                "mode": 420,
                "size": len(content),
                "modtime": "2023-11-14T22:13:20Z",
                "digest": sha256(content),
                "offset": start,
                "endOffset": len(out),
            }
        )
        split_lines.append({"type": 2, "name": name, "size": len(content), "position": position})
        position += 1
    out += compressor.compress(b"\0" * 1024)  # end of archive
    tar_split = "".join(json.dumps(line) + "\n" for line in split_lines).encode()
    tar_split_compressed = compressor.compress(tar_split)
    toc_doc: dict = {"version": 1, "entries": entries}
    if footer == 64:
        toc_doc["tarSplitDigest"] = sha256(tar_split_compressed)
    toc = json.dumps(toc_doc).encode()
    toc_compressed = compressor.compress(toc)
    toc_offset = len(out) + 8
    out += skippable_frame(toc_compressed)
    annotations: dict[str, str] = {}
    if footer == 64:
        split_offset = len(out) + 8
        out += skippable_frame(tar_split_compressed)
        payload = struct.pack(
            "<7Q",
            toc_offset,
            len(toc_compressed),
            len(toc),
            1,
            split_offset,
            len(tar_split_compressed),
            len(tar_split),
        )
        out += skippable_frame(payload + b"GNUlInUx")
        prefix = "io.github.containers.zstd-chunked."
        annotations = {
            prefix + "manifest-checksum": sha256(toc_compressed),
            prefix + "manifest-position": f"{toc_offset}:{len(toc_compressed)}:{len(toc)}:1",
            prefix + "tarsplit-position": f"{split_offset}:{len(tar_split_compressed)}:{len(tar_split)}",
        }
    else:
        payload = struct.pack("<4Q", toc_offset, len(toc_compressed), len(toc), 1)
        out += skippable_frame(payload + b"GnUlInUx")
        prefix = "io.containers.zstd-chunked."
        annotations = {
            prefix + "manifest-checksum": sha256(toc_compressed),
            prefix + "manifest-position": f"{toc_offset}:{len(toc_compressed)}:{len(toc)}:1",
        }
    return Layer(bytes(out), annotations if annotate else {}, toc, tar_split if footer == 64 else None)


def _gzip_member(data: bytes, extra: bytes | None = None) -> bytes:
    """One gzip member (RFC 1952), with an optional EXTRA field, deflated at level 6 (level 0 if empty)."""
    flags = 0x04 if extra is not None else 0
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0" + b"\0\xff"
    if extra is not None:
        header += struct.pack("<H", len(extra)) + extra
    deflater = zlib.compressobj(6 if data else 0, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(data) + deflater.flush()
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return header + body + trailer


def estargz_footer(toc_offset: int, legacy: bool = False) -> bytes:
    subfield = f"{toc_offset:016x}STARGZ".encode()
    extra = subfield if legacy else b"SG" + struct.pack("<H", len(subfield)) + subfield
    footer = _gzip_member(b"", extra)
    assert len(footer) == (47 if legacy else 51), len(footer)
    return footer


def estargz(files: list[tuple[str, bytes]], *, legacy: bool = False, annotate: bool = True) -> Layer:
    """An eStargz layer: one gzip member per file, then the TOC member (a tar holding stargz.index.json)
    and the 51-byte footer (47 bytes: the legacy stargz footer)."""
    out = bytearray()
    entries = []
    for name, content in files:
        offset = len(out)
        out += gzip.compress(_tar_header(name, len(content)) + content + b"\0" * (-len(content) % 512), mtime=0)
        entries.append(
            {
                "name": name,
                "type": "reg",
                "size": len(content),
                "mode": 420,
                "offset": offset,
                "digest": sha256(content),
            }
        )
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    toc_offset = len(out)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        tf.addfile(info, io.BytesIO(toc))
    out += gzip.compress(tar.getvalue(), mtime=0)
    out += estargz_footer(toc_offset, legacy)
    annotations = {"containerd.io/snapshot/stargz/toc.digest": sha256(toc)} if annotate else {}
    return Layer(bytes(out), annotations, toc, None, "application/vnd.oci.image.layer.v1.tar+gzip")


def small_files(count: int = 4, size: int = 3000, seed: int = 1) -> list[tuple[str, bytes]]:
    files = []
    for i in range(count):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32 + 1)
        files.append((f"usr/share/file{i}.bin", data[: size + i]))
    return files
