"""What the handler calls for GetBlobAt, GetLayerTOC and GetLayerTarSplit.

- :func:`open_ranges` picks how to read a blob's ranges: the verified blob-cache file (no network), the
  registry (``fetch.RegistryRanges``), or the local transport's file (``local``).
- :func:`produce_ranges` is the GetBlobAt producer: the ranges into the pipe, errors for FinishPipe.
- :func:`layer_toc` finds, fetches, decodes and verifies a layer's TOC (``toc``): located by annotations
  or, failing those, by the footer; trusted when it matches the annotation digest, or, without one, only
  after the whole layer matched its digest (the footer alone proves nothing).
- :func:`layer_tar_split` does the same for a zstd:chunked layer's tar-split, verified against the TOC's
  ``tarSplitDigest``; :func:`produce_tar_split` decompresses it into the pipe.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio
import zstandard

from protocol.digests import DigestVerifier
from protocol.errors import ProxyError
from proxy.common.pipes import write_all
from proxy.image import manifest as mf
from proxy.partial import toc as tocs
from proxy.partial.fetch import RangeSource, RegistryRanges, learn_size
from proxy.partial.local import FileRanges, ranges_of_blob
from proxy.partial.planner import ByteRange, RangeError
from proxy.registry.source import RegistrySource
from proxy.sources.base import Blob, ImageSource
from proxy.transfer.pipe import Pipe, run_producer

log = logging.getLogger(__name__)

#: bytes decompressed per write of a tar-split
TAR_SPLIT_CHUNK = 1 << 20


async def open_ranges(
    source: ImageSource,
    digest: str,
    size: int | None,
    what: str,
    probe_blobs: Sequence[mf.Descriptor] = (),
) -> RangeSource:
    """How to read ranges of ``digest`` (``size`` from the manifest when it names the blob).

    ``probe_blobs``: blobs the registry holds for the same image (its config and layers, not a config made by
    converting a schema 1 manifest): the smallest, if at most 256 KiB, is where a registry host not yet known
    to answer multi-range requests is probed (``fetch``). Without one, such a host gets single ranges."""
    cached = await source.cached_blob(digest, size)
    if cached is not None:
        window = cached.window()
        assert window is not None  # a cached blob is a verified file
        return FileRanges(window.fd, window.offset, window.length, what, cached.aclose)
    registry = source.ranged_source()
    if registry is not None:
        assert isinstance(registry, RegistrySource)
        if size is None:
            size = await learn_size(registry, digest, what)
        probes = [(d.digest, d.size) for d in probe_blobs if not d.urls]  # a foreign layer is not in the registry
        return RegistryRanges(registry, digest, size, what, probes)
    blob = await source.open_blob(digest)
    try:
        return ranges_of_blob(blob, lambda: source.open_blob(digest), what, size)
    except BaseException:
        await blob.aclose()
        raise


async def produce_ranges(pipe: Pipe, ranges_source: RangeSource, ranges: Sequence[ByteRange]) -> None:
    """GetBlobAt's producer: the ranges concatenated in request order; FinishPipe reports what failed."""

    async def write(data: memoryview) -> None:
        await write_all(pipe.writer, data)

    async def work() -> None:
        try:
            async with ranges_source:
                await ranges_source.copy(ranges, write)
        except RangeError as e:
            raise ProxyError(str(e)) from None

    await run_producer(pipe, work)


# ------------------------------------------------------------------------------------------- TOCs


@attrs.frozen
class Layer:
    """A layer of an opened image, and the ways to read it."""

    what: str
    digest: str
    descriptor: mf.Descriptor
    #: its ranges (see open_ranges); opened per use
    open_ranges: Callable[[], Awaitable[RangeSource]]
    #: the whole blob, as GetBlob reads it (through the blob cache when there is one)
    open_whole: Callable[[], Awaitable[Blob]]


def find_layer(parsed: mf.ImageManifest, digest: str, reference: str) -> mf.Descriptor:
    for desc in parsed.layers:
        if desc.digest == digest:
            return desc
    raise ProxyError(f"{reference}: {digest} is not a layer of this image")


@attrs.frozen
class LayerTOC:
    format: tocs.Format
    data: bytes  # the decoded TOC JSON, as the producer wrote it
    location: tocs.TocLocation
    #: the compressed tar-split, verified (only when asked for)
    tar_split: bytes | None = None


def _fail(layer: Layer, error: tocs.TocError) -> ProxyError:
    return ProxyError(f"{layer.what}: {error}")


async def _locate(layer: Layer, ranges: RangeSource) -> tocs.TocLocation:
    size = layer.descriptor.size
    location = tocs.from_annotations(layer.descriptor.annotations)
    if location is not None and location.toc is not None:
        return location
    tail_length = min(tocs.TAIL_SIZE, size)
    (tail,) = await ranges.read([ByteRange(size - tail_length, tail_length)])
    hint = tocs.from_footer(tail, size)
    if location is None:
        if hint is None:
            raise tocs.TocError("the layer has no zstd:chunked or eStargz annotations and no footer of either")
        return hint
    if hint is None or hint.format is not location.format:
        raise tocs.TocError(
            f"the layer's annotations name a {location.format.value} TOC digest but no footer says where"
        )
    return attrs.evolve(location, toc=hint.toc, tar_split=location.tar_split or hint.tar_split)


async def _read_verified(layer: Layer, regions: Sequence[tocs.Region]) -> list[bytes]:
    """``regions`` of the layer, read as part of the whole layer, which must match its digest."""
    captured = [bytearray() for _ in regions]
    verifier = DigestVerifier(layer.digest)
    blob = await layer.open_whole()
    async with blob:
        while chunk := await blob.read(1 << 20):
            start = verifier.size
            verifier.update(chunk)
            for region, out in zip(regions, captured, strict=True):
                lo, hi = max(region.offset, start), min(region.end, start + len(chunk))
                if lo < hi:
                    out += chunk[lo - start : hi - start]
    error = verifier.check(layer.descriptor.size)
    if error is not None:
        raise tocs.TocError(f"the layer has no annotation vouching for its TOC, and the layer itself failed: {error}")
    return [bytes(c) for c in captured]


async def layer_toc(layer: Layer, *, with_tar_split: bool = False) -> LayerTOC:
    """The layer's TOC, verified (see the module docstring); with its tar-split if asked for."""
    try:
        async with await layer.open_ranges() as ranges:
            location = await _locate(layer, ranges)
            tocs.check_caps(location, layer.descriptor.size)
            assert location.toc is not None
            regions = [location.toc]
            if with_tar_split:
                if location.format is not tocs.Format.ZSTD_CHUNKED or location.tar_split is None:
                    raise tocs.TocError(f"the {location.format.value} layer has no tar-split")
                regions.append(location.tar_split)
            if location.digest is not None:
                raw = await ranges.read([ByteRange(r.offset, r.length) for r in regions])
            else:
                log.info("%s: TOC located by its footer only: reading the whole layer to verify it", layer.what)
                raw = await _read_verified(layer, regions)
        data = tocs.decode_toc(location, raw[0])
        tar_split = None
        if with_tar_split:
            tar_split = raw[1]
            expected = tocs.tar_split_digest(data)
            if expected is None:
                if location.digest is not None:
                    raise tocs.TocError("the TOC names no tarSplitDigest: the tar-split cannot be verified")
            elif tocs.sha256_digest(tar_split) != expected:
                raise tocs.TocError(
                    f"the tar-split's digest is {tocs.sha256_digest(tar_split)}, the TOC says {expected}"
                )
        return LayerTOC(location.format, data, location, tar_split)
    except tocs.TocError as e:
        raise _fail(layer, e) from None
    except RangeError as e:
        raise ProxyError(str(e)) from None


async def produce_tar_split(pipe: Pipe, what: str, compressed: bytes) -> None:
    """GetLayerTarSplit's producer: the verified tar-split, decompressed (at most 150 MiB)."""

    async def work() -> None:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True)
        total = 0
        while True:
            try:
                chunk = reader.read(TAR_SPLIT_CHUNK)
            except zstandard.ZstdError as e:
                raise ProxyError(f"{what}: the tar-split does not decompress: {e}") from None
            if not chunk:
                return
            total += len(chunk)
            if total > tocs.MAX_TOC_SIZE:
                raise ProxyError(f"{what}: the tar-split decompresses to more than {tocs.MAX_TOC_SIZE >> 20} MiB")
            await write_all(pipe.writer, chunk)
            await trio.lowlevel.checkpoint()

    await run_producer(pipe, work)


__all__ = [
    "Layer",
    "LayerTOC",
    "find_layer",
    "layer_toc",
    "open_ranges",
    "produce_ranges",
    "produce_tar_split",
]
