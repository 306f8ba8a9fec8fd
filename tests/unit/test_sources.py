"""Local transports (oci:, oci-archive:, docker-archive:, dir:) and reference parsing,
on layouts built here and on copies the real skopeo makes of them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from proxy.image import manifest as mf
from proxy.server.transports import open_source
from proxy.sources.base import BlobNotFound, ImageNotFound, ImageSource, SourceError, SourceOptions
from tests.unit.layouts import (
    OCI_MANIFEST,
    OCILayout,
    digest,
    docker_archive,
    dumps,
    gz,
    skopeo,
    tar_bytes,
)

OPTS = SourceOptions()


async def read_all(source: ImageSource, d: str) -> bytes:
    blob = await source.open_blob(d)
    async with blob:
        out = bytearray()
        while chunk := await blob.read(7):
            out += chunk
        assert blob.size in (-1, len(out))
        return bytes(out)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[OCILayout, bytes, bytes]:
    lay = OCILayout(tmp_path / "oci")
    raw_a, desc_a = lay.image({"a.txt": b"A" * 1000})
    raw_b, desc_b = lay.image({"b.txt": b"B"})
    lay.add(desc_a, "a")
    lay.add(desc_b, "b")
    return lay, raw_a, raw_b


# ---- oci: ----------------------------------------------------------------------------------------


async def test_oci_tag_lookup_manifest_and_blobs(layout):
    lay, raw_a, _ = layout
    src = await open_source(f"oci:{lay.root}:a", OPTS)
    raw, mime = await src.get_manifest()
    assert (raw, mime) == (raw_a, OCI_MANIFEST)
    m = mf.parse_image_manifest(raw, mime)
    for d in (m.config, *m.layers):
        data = await read_all(src, d.digest)
        assert digest(data) == d.digest and len(data) == d.size
    await src.aclose()


async def test_oci_index_position_and_digest_references(layout):
    lay, raw_a, raw_b = layout
    assert (await (await open_source(f"oci:{lay.root}:@1", OPTS)).get_manifest())[0] == raw_b
    assert (await (await open_source(f"oci:{lay.root}:@{digest(raw_a)}", OPTS)).get_manifest())[0] == raw_a
    with pytest.raises(SourceError, match="index 2 is too large, only 2 entries available"):
        await open_source(f"oci:{lay.root}:@2", OPTS)
    with pytest.raises(SourceError, match="Invalid source index @x: not an integer"):
        await open_source(f"oci:{lay.root}:@x", OPTS)


async def test_oci_missing_tag_is_image_not_found_naming_the_reference(layout):
    lay, _, _ = layout
    ref = f"oci:{lay.root}:nope"
    with pytest.raises(ImageNotFound) as info:
        await open_source(ref, OPTS)
    assert str(info.value) == f'{ref}: no descriptor found for reference "nope"'


async def test_oci_several_images_need_a_reference(layout):
    lay, _, _ = layout
    with pytest.raises(SourceError, match="more than one image in oci, choose an image"):
        await open_source(f"oci:{lay.root}", OPTS)


async def test_oci_missing_directory_and_bad_index(tmp_path: Path):
    with pytest.raises(SourceError, match="no such file or directory"):
        await open_source(f"oci:{tmp_path}/absent", OPTS)
    (tmp_path / "index.json").write_text("{garbage")
    with pytest.raises(SourceError, match=r"oci:.*parsing .*index\.json"):
        await open_source(f"oci:{tmp_path}", OPTS)


async def test_oci_untrusted_digests_never_name_paths(tmp_path: Path):
    lay = OCILayout(tmp_path / "oci")
    lay.add({"mediaType": OCI_MANIFEST, "digest": "sha256:../../../etc/passwd", "size": 1}, "x")
    with pytest.raises(SourceError, match="invalid digest"):
        await open_source(f"oci:{lay.root}:x", OPTS)


async def test_oci_symlinks_leading_out_are_refused(layout, tmp_path: Path):
    lay, raw_a, _ = layout
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    d = digest(b"secret")
    os.symlink(secret, lay.root / "blobs" / "sha256" / d[7:])
    src = await open_source(f"oci:{lay.root}:a", OPTS)
    with pytest.raises(SourceError) as info:
        await src.open_blob(d)
    assert not isinstance(info.value, BlobNotFound)
    # a link that stays inside the layout is fine
    inside = lay.root / "blobs" / "sha256" / ("f" * 64)
    os.symlink(lay.root / "blobs" / "sha256" / digest(raw_a)[7:], inside)
    assert await read_all(src, "sha256:" + "f" * 64) == raw_a


async def test_oci_missing_blob(layout):
    lay, _, _ = layout
    src = await open_source(f"oci:{lay.root}:a", OPTS)
    with pytest.raises(BlobNotFound):
        await src.open_blob("sha256:" + "0" * 64)


async def test_oci_index_instances_get_their_mime_type(tmp_path: Path):
    lay = OCILayout(tmp_path / "oci")
    raw_a, desc_a = lay.image()
    desc_a["platform"] = {"architecture": "amd64", "os": "linux"}
    index_raw = dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [desc_a]})
    lay.add(lay.descriptor(mf.OCI_INDEX, index_raw), "multi")
    lay.index.append(desc_a)  # the instance is also listed at top level
    lay.write_index()
    src = await open_source(f"oci:{lay.root}:multi", OPTS)
    raw, mime = await src.get_manifest()
    assert mime == mf.OCI_INDEX
    chosen = mf.choose_instance(raw, mime, mf.wanted_platforms("linux", "amd64"))
    assert await src.get_manifest(chosen) == (raw_a, OCI_MANIFEST)


async def test_oci_layout_from_skopeo_copy_reads_the_same(layout, tmp_path: Path):
    lay, raw_a, _ = layout
    skopeo("copy", "-q", f"oci:{lay.root}:a", f"oci:{tmp_path / 'copy'}:t")
    want = skopeo("inspect", "--raw", f"oci:{tmp_path / 'copy'}:t")
    raw, _ = await (await open_source(f"oci:{tmp_path / 'copy'}:t", OPTS)).get_manifest()
    assert raw == want == raw_a


# ---- dir: ----------------------------------------------------------------------------------------


async def test_dir_from_skopeo_copy(layout, tmp_path: Path):
    lay, raw_a, _ = layout
    skopeo("copy", "-q", f"oci:{lay.root}:a", f"dir:{tmp_path / 'd'}")
    src = await open_source(f"dir:{tmp_path / 'd'}", OPTS)
    raw, mime = await src.get_manifest()
    assert raw == skopeo("inspect", "--raw", f"dir:{tmp_path / 'd'}") == raw_a and mime == OCI_MANIFEST
    m = mf.parse_image_manifest(raw, mime)
    for d in (m.config, *m.layers):
        assert digest(await read_all(src, d.digest)) == d.digest
    with pytest.raises(BlobNotFound):
        await src.open_blob("sha256:" + "0" * 64)


async def test_dir_legacy_tar_names_and_instances(tmp_path: Path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "manifest.json").write_bytes(b'{"schemaVersion":2,"mediaType":"%s"}' % mf.OCI_INDEX.encode())
    (root / f"{'a' * 64}.tar").write_bytes(b"layer")
    (root / f"{'b' * 64}.manifest.json").write_bytes(b"{}")
    src = await open_source(f"dir:{root}", OPTS)
    assert (await src.get_manifest())[1] == mf.OCI_INDEX
    assert (await src.get_manifest("sha256:" + "b" * 64))[0] == b"{}"
    assert await read_all(src, "sha256:" + "a" * 64) == b"layer"


async def test_dir_missing(tmp_path: Path):
    with pytest.raises(SourceError, match=r"^dir:.*is not a directory"):
        await open_source(f"dir:{tmp_path / 'nope'}", OPTS)


# ---- oci-archive: ----------------------------------------------------------------------------------


def fds_under(directory: Path) -> list[str]:
    """What this process holds open under ``directory`` (an unnamed temporary file shows as ``DIR/#N (deleted)``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


@pytest.mark.parametrize("compressed", [False, True])
async def test_oci_archive_from_skopeo_copy_read_in_place(layout, tmp_path: Path, compressed: bool):
    lay, raw_a, _ = layout
    archive = tmp_path / "img.tar"
    skopeo("copy", "-q", f"oci:{lay.root}:a", f"oci-archive:{archive}:t")
    want = skopeo("inspect", "--raw", f"oci-archive:{archive}:t")
    if compressed:
        archive.write_bytes(gz(archive.read_bytes()))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    src = await open_source(f"oci-archive:{archive}:t", SourceOptions(tmpdir=str(tmp)))
    assert os.listdir(tmp) == []  # nothing unpacked; a compressed archive's copy has no name
    assert len(fds_under(tmp)) == (1 if compressed else 0)
    assert src.local_path == str(archive)
    raw, mime = await src.get_manifest()
    assert raw == want == raw_a
    m = mf.parse_image_manifest(raw, mime)
    for d in (m.config, *m.layers):
        assert digest(await read_all(src, d.digest)) == d.digest
    await src.aclose()
    assert os.listdir(tmp) == [] and fds_under(tmp) == []
    with pytest.raises(ImageNotFound):
        await open_source(f"oci-archive:{archive}:other", SourceOptions(tmpdir=str(tmp)))
    assert os.listdir(tmp) == [] and fds_under(tmp) == []


async def test_oci_archive_missing_file_and_hostile_members(tmp_path: Path):
    with pytest.raises(SourceError, match='archive file not found: "'):
        await open_source(f"oci-archive:{tmp_path / 'absent.tar'}", OPTS)
    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_bytes({"../escape": b"x", "index.json": b"{}"}))
    with pytest.raises(SourceError, match=r'member "\.\./escape": name has a "\.\." component; refused'):
        await open_source(f"oci-archive:{evil}", SourceOptions(tmpdir=str(tmp_path)))
    assert not (tmp_path.parent / "escape").exists()


# ---- docker-archive: ---------------------------------------------------------------------------------


async def test_docker_archive_from_skopeo_copy_matches_skopeo_inspect(layout, tmp_path: Path):
    lay, _, _ = layout
    archive = tmp_path / "d.tar"
    skopeo("copy", "-q", f"oci:{lay.root}:a", f"docker-archive:{archive}:example.com/x/y:v1")
    want = skopeo("inspect", "--raw", f"docker-archive:{archive}")
    for ref in (
        f"docker-archive:{archive}",
        f"docker-archive:{archive}:example.com/x/y:v1",
        f"docker-archive:{archive}:@0",
    ):
        src = await open_source(ref, OPTS)
        raw, mime = await src.get_manifest()
        assert (raw, mime) == (want, mf.DOCKER_V2S2)
    m = mf.parse_image_manifest(raw, mime)
    cfg = await read_all(src, m.config.digest)
    assert digest(cfg) == m.config.digest
    for layer in m.layers:
        assert digest(await read_all(src, layer.digest)) == layer.digest  # decompressed: bytes match diffID
    with pytest.raises(SourceError, match=r'Tag "docker\.io/library/other:latest" not found'):
        await open_source(f"docker-archive:{archive}:other", OPTS)


@pytest.mark.parametrize("new_layout", [False, True])
@pytest.mark.parametrize("compress", [False, True])
async def test_docker_archive_layouts_and_compressed_layers(tmp_path: Path, new_layout: bool, compress: bool):
    layers = [tar_bytes({"x": b"1" * 5000}), tar_bytes({"y": b"2"})]
    archive = tmp_path / "d.tar"
    cfg, _ = docker_archive(
        archive, layers, repo_tags=["busybox:latest"], new_layout=new_layout, compress_layers=compress
    )
    src = await open_source(f"docker-archive:{archive}:busybox", OPTS)
    raw, _ = await src.get_manifest()
    assert raw == skopeo("inspect", "--raw", f"docker-archive:{archive}:busybox:latest")
    doc = json.loads(raw)
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers"]
    assert list(doc["layers"][0]) == ["mediaType", "size", "digest"]
    assert [layer["size"] for layer in doc["layers"]] == [len(t) for t in layers]
    assert await read_all(src, digest(cfg)) == cfg
    for t in layers:
        assert await read_all(src, digest(t)) == t
    with pytest.raises(BlobNotFound):
        await src.open_blob("sha256:" + "0" * 64)
    await src.aclose()


async def test_docker_archive_compressed_archive_uses_a_removed_temp_file(tmp_path: Path):
    plain = tmp_path / "d.tar"
    docker_archive(plain, [tar_bytes({"x": b"1"})])
    packed = tmp_path / "d.tar.gz"
    packed.write_bytes(gz(plain.read_bytes()))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    src = await open_source(f"docker-archive:{packed}", SourceOptions(tmpdir=str(tmp)))
    plain_src = await open_source(f"docker-archive:{plain}", OPTS)
    assert (await src.get_manifest())[0] == (await plain_src.get_manifest())[0]
    await plain_src.aclose()
    assert os.listdir(tmp) == []  # the decompressed copy never has a name
    (held,) = fds_under(tmp)
    assert held.endswith(" (deleted)")
    await src.aclose()
    assert fds_under(tmp) == []


async def test_docker_archive_errors(tmp_path: Path):
    archive = tmp_path / "d.tar"
    docker_archive(archive, [tar_bytes({"x": b"1"})], extra_images=1)
    with pytest.raises(SourceError, match="expected 1 item, got 2"):
        await open_source(f"docker-archive:{archive}", OPTS)
    with pytest.raises(SourceError, match="Invalid source index @5, only 2 manifest items available"):
        await open_source(f"docker-archive:{archive}:@5", OPTS)
    with pytest.raises(SourceError, match="no such file"):
        await open_source(f"docker-archive:{tmp_path / 'absent'}", OPTS)
    with pytest.raises(SourceError, match="repository name must be lowercase"):
        await open_source(f"docker-archive:{archive}:UPPER", OPTS)


# ---- reference parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("noTransport", r'^Invalid image name "noTransport", expected colon-separated transport:reference$'),
        ("nope:x", r'^Invalid image name "nope:x", unknown transport "nope"$'),
        (
            "containers-storage:busybox",
            r"^containers-storage:busybox: .*containers-storage.*cannot work in image-proxy",
        ),
        ("docker-daemon:busybox:latest", r"^docker-daemon:busybox:latest: .*docker-daemon.*cannot work in image-proxy"),
        ("docker://quay.io/x/y", r"^docker://quay.io/x/y: the docker:// transport is not available in this context"),
    ],
)
async def test_reference_errors_name_the_reference(ref, message):
    with pytest.raises(SourceError, match=message):
        await open_source(ref, OPTS)


def test_blob_digest_helper_is_sha256():
    assert digest(b"") == "sha256:" + hashlib.sha256(b"").hexdigest()
