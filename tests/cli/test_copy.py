"""``image-proxy copy`` from the real registry (images pushed by the real skopeo), read back by the real skopeo."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.cli.helpers import INSECURE, image_proxy, skopeo_json, skopeo_run
from tests.support.images import AMD64, ARM64

ROOT = Path(__file__).resolve().parents[2]


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("repository", "image", "flags"),
    [
        ("test/single", "single", AMD64),
        ("test/multi", "multi-arm64", ARM64),
        ("test/v2s2", "v2s2", AMD64),
    ],
)
def test_copy_to_an_oci_layout_that_skopeo_reads_back(repository, image, flags, registry_images, skopeo, tmp_path):
    images = registry_images.images
    built = {"single": images.single, "multi-arm64": images.multi.instances["arm64"], "v2s2": images.v2s2}[image]
    layout = tmp_path / "layout"
    result = image_proxy("copy", "-q", INSECURE, *flags, registry_images.ref(repository), f"oci:{layout}:copied")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""

    index = json.loads((layout / "index.json").read_bytes())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "copied"
    stored = layout / "blobs" / "sha256" / entry["digest"].split(":", 1)[1]
    assert sha256_file(stored) == entry["digest"] and stored.stat().st_size == entry["size"]
    if image == "v2s2":
        # written as the OCI manifest the proxy converted it to; the registry's digest is kept in an annotation
        assert entry["digest"] != built.manifest_digest
        assert entry["annotations"]["io.github.image-proxy.source-digest"] == built.manifest_digest
    else:
        assert entry["digest"] == built.manifest_digest and stored.read_bytes() == built.manifest
    no_partials = [p.name for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    assert no_partials == []

    inspected = skopeo_json(skopeo, "inspect", f"oci:{layout}:copied")
    assert inspected["Digest"] == entry["digest"]
    assert inspected["Layers"] == [layer.digest for layer in built.layers]
    assert inspected["Architecture"] == built.config_json["architecture"]
    # and skopeo copies it on: every blob is where the layout says and has the right digest
    skopeo_run(skopeo, "copy", f"oci:{layout}:copied", f"dir:{tmp_path / 'again'}")
    for layer in built.layers:
        assert sha256_file(tmp_path / "again" / layer.digest.split(":", 1)[1]) == layer.digest


def test_copy_to_a_dir_layout_and_into_an_existing_oci_layout(registry_images, skopeo, tmp_path):
    single = registry_images.images.single
    ref = registry_images.ref("test/single")
    assert image_proxy("copy", "-q", INSECURE, ref, f"dir:{tmp_path / 'd'}").returncode == 0
    assert (tmp_path / "d" / "version").read_text() == "Directory Transport Version: 1.1\n"
    assert (tmp_path / "d" / "manifest.json").read_bytes() == single.manifest
    skopeo_run(skopeo, "copy", f"dir:{tmp_path / 'd'}", f"oci:{tmp_path / 'o'}:a")

    # a second tag in the layout skopeo wrote: both tags stay readable; the same tag again is replaced, not added
    for _ in range(2):
        result = image_proxy("copy", "-q", INSECURE, ref, f"oci:{tmp_path / 'o'}:b")
        assert result.returncode == 0, result.stderr
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in skopeo_json_index(tmp_path / "o")]
    assert sorted(names) == ["a", "b"]
    for tag in ("a", "b"):
        assert skopeo_json(skopeo, "inspect", f"oci:{tmp_path / 'o'}:{tag}")["Digest"] == single.manifest_digest


def skopeo_json_index(layout: Path) -> list[dict]:
    return json.loads((layout / "index.json").read_bytes())["manifests"]


def test_copy_of_the_shipped_example_needs_no_network(skopeo, tmp_path):
    """The README's main job."""
    result = image_proxy("copy", f"oci:{ROOT / 'examples/hello'}:latest", f"oci:{tmp_path / 'hello'}:latest")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Copied ") and "manifest sha256:" in result.stdout
    inspected = skopeo_json(skopeo, "inspect", f"oci:{tmp_path / 'hello'}:latest")
    index = json.loads((ROOT / "examples/hello/index.json").read_bytes())
    assert inspected["Digest"] == index["manifests"][0]["digest"]


def test_copy_refuses_a_directory_that_is_not_a_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = image_proxy("copy", f"oci:{ROOT / 'examples/hello'}:latest", f"oci:{tmp_path}:x")
    assert result.returncode == 1
    assert "not empty and not an OCI layout" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    bad = image_proxy("copy", f"oci:{ROOT / 'examples/hello'}:latest", "docker://somewhere/else")
    assert bad.returncode == 2 and "cannot copy to the docker: transport" in bad.stderr


def test_copy_commits_no_blob_the_proxy_did_not_verify(tmp_path):
    """copy splices the bytes into the destination unread: the proxy's digest check (FinishPipe) is what decides.
    A layer damaged in the source (same size, one byte flipped) fails the copy, naming the digest, and leaves
    nothing under that digest's name in the destination, not even a temporary file."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "examples/hello", source)
    index = json.loads((source / "index.json").read_bytes())
    manifest = json.loads((source / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    blob = source / "blobs/sha256" / layer.split(":")[1]
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    result = image_proxy("copy", f"oci:{source}:latest", f"oci:{tmp_path / 'out'}:latest")
    assert result.returncode == 1, result.stderr
    assert layer in result.stderr
    left = [p.name for p in (tmp_path / "out/blobs/sha256").iterdir()]
    assert not [name for name in left if layer.split(":")[1] in name], left


def test_settings_the_commands_proxy_cannot_use_are_reported_before_anything_is_written(tmp_path):
    """The proxy a command starts is built from the flags it passes on before anything is fetched: a broken
    --config or contradicting flags end the command with status 2 and the reason, as the proxy itself does."""
    config = tmp_path / "bad.toml"
    config.write_text("bad = [")
    out = tmp_path / "out"
    result = image_proxy("copy", "--config", str(config), f"oci:{ROOT / 'examples/hello'}:latest", f"oci:{out}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"image-proxy copy: {config}: not valid TOML")
    assert not out.exists()
    both = image_proxy("inspect", "--insecure-policy", "--require-signed", f"oci:{ROOT / 'examples/hello'}:latest")
    assert both.returncode == 2
    assert both.stderr == "image-proxy inspect: --insecure-policy and --require-signed cannot be used together\n"
