"""Locating, decoding and trusting TOCs (sans-I/O), on layers built per the format notes."""

from __future__ import annotations

import pytest

from proxy.partial import toc as tocs
from tests.partial.layers import estargz, sha256, small_files, zstd_chunked


def region_bytes(blob: bytes, region: tocs.Region) -> bytes:
    return blob[region.offset : region.end]


@pytest.mark.parametrize("footer", [64, 40])
def test_zstd_chunked_from_annotations_and_from_footer(footer):
    layer = zstd_chunked(small_files(), footer=footer)
    by_annotations = tocs.from_annotations(layer.annotations)
    by_footer = tocs.from_footer(layer.blob[-tocs.TAIL_SIZE :], len(layer.blob))
    assert by_annotations is not None and by_footer is not None
    assert by_annotations.toc == by_footer.toc
    assert by_annotations.tar_split == by_footer.tar_split
    assert (by_annotations.tar_split is not None) == (footer == 64)
    assert by_annotations.digest is not None and by_footer.digest is None and by_footer.source == "footer"
    data = tocs.decode_toc(by_annotations, region_bytes(layer.blob, by_annotations.toc))
    assert data == layer.toc
    if footer == 64:
        assert tocs.tar_split_digest(data) == sha256(region_bytes(layer.blob, by_annotations.tar_split))


@pytest.mark.parametrize("legacy", [False, True])
def test_estargz_footer_and_annotation(legacy):
    layer = estargz(small_files(), legacy=legacy)
    location = tocs.from_annotations(layer.annotations)
    assert location is not None and location.format is tocs.Format.ESTARGZ and location.toc is None
    region = tocs.parse_estargz_footer(layer.blob[-tocs.TAIL_SIZE :], len(layer.blob))
    assert region is not None and region.end == len(layer.blob) - (47 if legacy else 51)
    location = tocs.TocLocation(location.format, region, None, location.digest)
    assert tocs.decode_toc(location, region_bytes(layer.blob, region)) == layer.toc


def test_a_toc_that_does_not_match_its_annotation_is_an_error():
    layer = zstd_chunked(small_files())
    location = tocs.from_annotations(layer.annotations)
    other = zstd_chunked(small_files(seed=2))
    wrong = tocs.TocLocation(location.format, location.toc, location.tar_split, sha256(b"not it"))
    with pytest.raises(tocs.TocError, match="annotation says sha256:"):
        tocs.decode_toc(wrong, region_bytes(layer.blob, location.toc))
    stargz = estargz(small_files())
    region = tocs.parse_estargz_footer(stargz.blob[-72:], len(stargz.blob))
    forged = tocs.TocLocation(tocs.Format.ESTARGZ, region, None, sha256(other.toc))
    with pytest.raises(tocs.TocError, match="annotation says"):
        tocs.decode_toc(forged, region_bytes(stargz.blob, region))


def test_both_formats_annotated_is_refused():
    annotations = {**zstd_chunked(small_files()).annotations, **estargz(small_files()).annotations}
    with pytest.raises(tocs.TocError, match="both a zstd:chunked and an eStargz"):
        tocs.from_annotations(annotations)


@pytest.mark.parametrize(
    ("annotations", "error"),
    [
        ({"io.github.containers.zstd-chunked.manifest-position": "1:2:3"}, "expected 4 numbers"),
        ({"io.github.containers.zstd-chunked.manifest-position": "1:2:3:2"}, "only type 1"),
        ({"io.containers.zstd-chunked.manifest-checksum": "md5:abc"}, "not a sha256 digest"),
    ],
)
def test_bad_annotations(annotations, error):
    with pytest.raises(tocs.TocError, match=error):
        tocs.from_annotations(annotations)


def test_caps_and_positions_outside_the_blob():
    big = tocs.TocLocation(tocs.Format.ZSTD_CHUNKED, tocs.Region(0, 10, tocs.MAX_TOC_SIZE + 1))
    with pytest.raises(tocs.TocError, match="150 MiB"):
        tocs.check_caps(big, 1000)
    outside = tocs.TocLocation(tocs.Format.ZSTD_CHUNKED, tocs.Region(990, 20, 5))
    with pytest.raises(tocs.TocError, match="outside the 1000-byte blob"):
        tocs.check_caps(outside, 1000)


def test_no_footer_in_an_ordinary_blob():
    assert tocs.from_footer(b"\0" * 72, 1000) is None
    assert tocs.from_footer(b"abc", 3) is None


def test_decompression_is_capped():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 20))
    with pytest.raises(tocs.TocError, match="more than"):
        tocs.zstd_decompress(bomb, 1000, "TOC")
