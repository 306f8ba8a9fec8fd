"""Where the table of contents (TOC) of a zstd:chunked or eStargz layer is, and how to decode and trust it
(sans-I/O: the caller fetches the bytes).

**zstd:chunked** (containers/storage): after the tar stream's zstd frames come skippable frames (magic
``50 2A 4D 18``, LE u32 length): the zstd-compressed TOC JSON, the zstd-compressed tar-split, and a footer.
The footer is 64 bytes (LE u64s: TOC offset, compressed length, uncompressed length, type 1, tar-split
offset, compressed length, uncompressed length, magic ``GNUlInUx``), or 40 bytes in the older format that
Debian's skopeo 1.9.3 writes and stargz-snapshotter uses (the first four fields and magic ``GnUlInUx``, no
tar-split). Annotations: ``io.github.containers.zstd-chunked.manifest-checksum`` (sha256 of the
*compressed* TOC: the trust anchor), ``...manifest-position`` (``offset:length:uncompressed:type``) and
``...tarsplit-position`` (``offset:length:uncompressed``); older producers write the same names without
``github.``. The TOC's ``tarSplitDigest`` is the digest of the compressed tar-split.

**eStargz**: a tar.gz made of gzip members; the TOC is a gzip member holding a tar whose one entry is
``stargz.index.json``, followed by a 51-byte footer (an empty gzip member whose extra field has subfield
``SG`` with ``%016xSTARGZ``, the TOC offset in hex) or the 47-byte legacy footer (extra field without the
subfield header). Annotation ``containerd.io/snapshot/stargz/toc.digest`` is the digest of the *uncompressed*
TOC JSON; the TOC spans ``[offset, size - footer)``.

Trust: a TOC is returned only when it matches the annotation digest, or, for a layer without one, when the
whole layer matched its own digest (the footer is a hint, never evidence). Caps: 150 MiB compressed and
uncompressed, as containers/storage.
"""

from __future__ import annotations

import enum
import hashlib
import io
import re
import struct
import tarfile
import zlib

import attrs
import zstandard

from proxy.common import jsonlimits

MAX_TOC_SIZE = 150 << 20
#: the most of a layer's end we read to find a footer (covers 64 + 8, 40 + 8, 51 and 47)
TAIL_SIZE = 72

ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_CHUNKED_MAGIC = b"GNUlInUx"  # 64-byte footer
ZSTD_CHUNKED_MAGIC_OLD = b"GnUlInUx"  # 40-byte footer
ZSTD_FOOTER = 64
ZSTD_FOOTER_OLD = 40
ESTARGZ_FOOTER = 51
ESTARGZ_FOOTER_LEGACY = 47
ESTARGZ_TOC_NAME = "stargz.index.json"

ZSTD_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
ESTARGZ_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


class TocError(ValueError):
    """The layer has no usable TOC, or it does not match what vouches for it."""


class Format(enum.Enum):
    ZSTD_CHUNKED = "zstd:chunked"
    ESTARGZ = "estargz"


@attrs.frozen
class Region:
    """``length`` bytes of the blob from ``offset``; ``uncompressed`` when known."""

    offset: int
    length: int
    uncompressed: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@attrs.frozen
class TocLocation:
    """What we know of a layer's TOC. ``toc`` is None for eStargz until its footer was read;
    ``digest`` is the annotation's trust anchor (None: the layer digest must vouch)."""

    format: Format
    toc: Region | None
    tar_split: Region | None = None
    digest: str | None = None
    source: str = "annotations"  # or "footer"


# ------------------------------------------------------------------------------------- annotations


def _parse_position(value: str, fields: int, what: str) -> list[int]:
    parts = value.split(":")
    if len(parts) != fields or not all(p.isdigit() for p in parts):
        raise TocError(f"annotation {what} is {value!r}, expected {fields} numbers separated by ':'")
    return [int(p) for p in parts]


def _checked_digest(value: str, what: str) -> str:
    if not _DIGEST.match(value):
        raise TocError(f"annotation {what} is {value!r}, not a sha256 digest")
    return value


def from_annotations(annotations: dict[str, str] | None) -> TocLocation | None:
    """The TOC as the layer's annotations describe it (both zstd:chunked prefixes), or None without any."""
    annotations = annotations or {}
    zstd = None
    for prefix in ZSTD_PREFIXES:
        checksum = annotations.get(prefix + "manifest-checksum")
        position = annotations.get(prefix + "manifest-position")
        if checksum is None and position is None:
            continue
        toc = None
        if position is not None:
            offset, length, uncompressed, kind = _parse_position(position, 4, prefix + "manifest-position")
            if kind != 1:
                raise TocError(f"annotation {prefix}manifest-position has TOC type {kind}; only type 1 is known")
            toc = Region(offset, length, uncompressed)
        tar_split = None
        split_position = annotations.get(prefix + "tarsplit-position")
        if split_position is not None:
            offset, length, uncompressed = _parse_position(split_position, 3, prefix + "tarsplit-position")
            tar_split = Region(offset, length, uncompressed)
        digest = _checked_digest(checksum, prefix + "manifest-checksum") if checksum is not None else None
        zstd = TocLocation(Format.ZSTD_CHUNKED, toc, tar_split, digest)
        break
    estargz_digest = annotations.get(ESTARGZ_DIGEST_ANNOTATION)
    if zstd is not None and estargz_digest is not None:
        raise TocError("the layer's annotations name both a zstd:chunked and an eStargz TOC")
    if estargz_digest is not None:
        return TocLocation(Format.ESTARGZ, None, None, _checked_digest(estargz_digest, ESTARGZ_DIGEST_ANNOTATION))
    return zstd


def check_caps(location: TocLocation, blob_size: int) -> None:
    for name, region in (("TOC", location.toc), ("tar-split", location.tar_split)):
        if region is None:
            continue
        if region.length > MAX_TOC_SIZE or (region.uncompressed or 0) > MAX_TOC_SIZE:
            raise TocError(f"the {name} is larger than the {MAX_TOC_SIZE >> 20} MiB limit")
        if region.end > blob_size or region.length == 0:
            raise TocError(
                f"the {name} position ({region.offset}+{region.length}) is outside the {blob_size}-byte blob"
            )


# ------------------------------------------------------------------------------------------ footers


def _zstd_footer(tail: bytes, blob_size: int) -> TocLocation | None:
    # Both magics are accepted with both sizes: the frame's declared size tells the layout.
    for size in (ZSTD_FOOTER, ZSTD_FOOTER_OLD):
        framed = size + 8
        if len(tail) < framed or blob_size < framed:
            continue
        frame = tail[-framed:]
        if frame[:4] != ZSTD_SKIPPABLE_MAGIC or struct.unpack("<I", frame[4:8])[0] != size:
            continue
        footer = frame[8:]
        if footer[-8:] not in (ZSTD_CHUNKED_MAGIC, ZSTD_CHUNKED_MAGIC_OLD):
            continue
        offset, length, uncompressed, kind = struct.unpack("<4Q", footer[:32])
        if kind != 1:
            return None
        tar_split = None
        if size == ZSTD_FOOTER:
            split_offset, split_length, split_uncompressed = struct.unpack("<3Q", footer[32:56])
            if split_length:
                tar_split = Region(split_offset, split_length, split_uncompressed)
        return TocLocation(Format.ZSTD_CHUNKED, Region(offset, length, uncompressed), tar_split, None, "footer")
    return None


def parse_estargz_footer(tail: bytes, blob_size: int) -> Region | None:
    """The TOC region an eStargz footer (51 bytes, or 47 legacy) at the end of ``tail`` points to."""
    for size in (ESTARGZ_FOOTER, ESTARGZ_FOOTER_LEGACY):
        if len(tail) < size or blob_size < size:
            continue
        footer = tail[-size:]
        if footer[:4] != b"\x1f\x8b\x08\x04":
            continue
        (xlen,) = struct.unpack("<H", footer[10:12])
        extra = footer[12 : 12 + xlen]
        if size == ESTARGZ_FOOTER:
            if xlen != 26 or extra[:2] != b"SG" or struct.unpack("<H", extra[2:4])[0] != 22:
                continue
            payload = extra[4:]
        else:
            if xlen != 22:
                continue
            payload = extra
        if payload[16:] != b"STARGZ":
            continue
        try:
            offset = int(payload[:16].decode("ascii"), 16)
        except ValueError:
            continue
        if offset >= blob_size - size:
            continue
        return Region(offset, blob_size - size - offset)
    return None


def from_footer(tail: bytes, blob_size: int) -> TocLocation | None:
    """A hint from the layer's last bytes (up to TAIL_SIZE): never trusted by itself."""
    found = _zstd_footer(tail, blob_size)
    if found is not None:
        return found
    region = parse_estargz_footer(tail, blob_size)
    if region is not None:
        return TocLocation(Format.ESTARGZ, region, None, None, "footer")
    return None


# ----------------------------------------------------------------------------------------- decoding


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def zstd_decompress(data: bytes, limit: int, what: str) -> bytes:
    """One or more zstd frames, at most ``limit`` bytes out."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        out = reader.read(limit + 1)
    except zstandard.ZstdError as e:
        raise TocError(f"the {what} does not decompress: {e}") from None
    if len(out) > limit:
        raise TocError(f"the {what} decompresses to more than {limit >> 20} MiB")
    return out


def decode_zstd_toc(location: TocLocation, compressed: bytes) -> bytes:
    """The TOC JSON of a zstd:chunked layer, checked against the annotation digest if there is one."""
    if location.digest is not None and sha256_digest(compressed) != location.digest:
        raise TocError(
            f"the TOC's digest is {sha256_digest(compressed)}, but the layer's annotation says {location.digest}"
        )
    data = zstd_decompress(compressed, MAX_TOC_SIZE, "TOC")
    region = location.toc
    if region is not None and region.uncompressed is not None and len(data) != region.uncompressed:
        raise TocError(f"the TOC decompresses to {len(data)} bytes, its position says {region.uncompressed}")
    return data


def decode_estargz_toc(location: TocLocation, compressed: bytes) -> bytes:
    """``stargz.index.json`` from the TOC's gzip member, checked against the annotation digest if any."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        tar_bytes = inflater.decompress(compressed, MAX_TOC_SIZE + 4096)
    except zlib.error as e:
        raise TocError(f"the eStargz TOC does not decompress: {e}") from None
    if inflater.unconsumed_tail:
        raise TocError(f"the eStargz TOC decompresses to more than {MAX_TOC_SIZE >> 20} MiB")
    data = None
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar:
                if member.name == ESTARGZ_TOC_NAME and member.isreg():
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else None
                    break
    except tarfile.TarError as e:
        raise TocError(f"the eStargz TOC is not a tar: {e}") from None
    if data is None:
        raise TocError(f"the eStargz TOC has no {ESTARGZ_TOC_NAME}")
    if location.digest is not None and sha256_digest(data) != location.digest:
        raise TocError(f"the TOC's digest is {sha256_digest(data)}, but the layer's annotation says {location.digest}")
    return data


def decode_toc(location: TocLocation, raw: bytes) -> bytes:
    if location.format is Format.ZSTD_CHUNKED:
        return decode_zstd_toc(location, raw)
    return decode_estargz_toc(location, raw)


def tar_split_digest(toc_json: bytes) -> str | None:
    """The ``tarSplitDigest`` a zstd:chunked TOC names (None: an older TOC without one)."""
    try:
        doc = jsonlimits.loads(toc_json)
    except jsonlimits.NestingError as e:
        raise TocError(f"the TOC is {e}") from None
    except ValueError:
        raise TocError("the TOC is not JSON") from None
    value = doc.get("tarSplitDigest") if isinstance(doc, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise TocError(f"the TOC's tarSplitDigest {value!r} is not a sha256 digest")
    return value


__all__ = [
    "MAX_TOC_SIZE",
    "TAIL_SIZE",
    "Format",
    "Region",
    "TocError",
    "TocLocation",
    "check_caps",
    "decode_toc",
    "from_annotations",
    "from_footer",
    "parse_estargz_footer",
    "tar_split_digest",
    "zstd_decompress",
]
