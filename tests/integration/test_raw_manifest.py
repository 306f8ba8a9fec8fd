"""GetRawManifest (extension ``raw-manifest``, docs/PROTOCOL.md): the manifest or index a reference names, exactly
as stored, with its digest and media type, without choosing a platform. The reference output is the real
``skopeo inspect --raw`` of images the real skopeo pushed to a real registry (``skopeo copy --all`` for the
multi-platform ones)."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.support.images import AMD64, platform_flags, skopeo_copy

INSECURE = "--tls-verify=false"
#: no instance of the test indexes is for this platform
RISCV64 = platform_flags("riscv64")


def skopeo_raw(skopeo: str, ref: str) -> bytes:
    done = subprocess.run([skopeo, "inspect", "--raw", INSECURE, ref], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def docker_list_ref(registry_images) -> str:
    """A Docker manifest list of schema2 instances, pushed with ``skopeo copy --all --format v2s2`` (without
    ``--format`` skopeo pushes the layout's ``v2list`` as the OCI index its index.json entry is typed as)."""
    ref = registry_images.ref("test/v2list")
    layout = registry_images.images.layout.path
    skopeo_copy(f"oci:{layout}:v2list", ref, "--dest-tls-verify=false", "--all", "--format", "v2s2")
    return ref


async def test_capabilities_list_raw_manifest():
    async with ImageProxy.spawn(extra_args=["--insecure-policy"]) as proxy:
        assert "raw-manifest" in await proxy.get_capabilities()


async def test_an_index_pushed_with_all_is_returned_as_skopeo_reads_it(registry_images, skopeo):
    ref = registry_images.ref("test/multi")
    expected = await trio.to_thread.run_sync(skopeo_raw, skopeo, ref)
    async with ImageProxy.spawn(extra_args=["--insecure-policy", INSECURE, *AMD64]) as proxy:
        raw = await proxy.get_raw_manifest(ref)
        image = await proxy.open_image(ref)
        instance_digest, _ = await proxy.get_manifest(image)
    assert raw.data == expected
    assert raw.digest == sha256(expected) == registry_images.multi.digest
    assert raw.media_type == json.loads(expected)["mediaType"] == "application/vnd.oci.image.index.v1+json"
    # GetManifest chose the amd64 instance of that very index
    assert instance_digest == registry_images.multi.instances["amd64"].manifest_digest
    assert instance_digest in {entry["digest"] for entry in json.loads(expected)["manifests"]}


async def test_no_platform_is_chosen(registry_images, skopeo):
    """With no instance for the wanted platform OpenImage fails, as skopeo's does; GetRawManifest still answers."""
    ref = registry_images.ref("test/multi")
    async with ImageProxy.spawn(extra_args=["--insecure-policy", INSECURE, *RISCV64]) as proxy:
        with pytest.raises(ProxyError, match="no image found in image index for architecture"):
            await proxy.open_image(ref)
        raw = await proxy.get_raw_manifest(ref)
    assert raw.data == await trio.to_thread.run_sync(skopeo_raw, skopeo, ref)


async def test_a_docker_manifest_list_and_a_schema2_image_are_not_converted(registry_images, docker_list_ref, skopeo):
    """GetManifest serves OCI (schema2 converted); GetRawManifest the stored bytes and their own media type."""
    v2s2 = registry_images.ref("test/v2s2")
    async with ImageProxy.spawn(extra_args=["--insecure-policy", INSECURE, *AMD64]) as proxy:
        listed = await proxy.get_raw_manifest(docker_list_ref)
        single = await proxy.get_raw_manifest(v2s2)
        image = await proxy.open_image(v2s2)
        served_digest, served = await proxy.get_manifest(image)
    expected_list = await trio.to_thread.run_sync(skopeo_raw, skopeo, docker_list_ref)
    assert listed.data == expected_list and listed.digest == sha256(expected_list)
    assert listed.media_type == json.loads(expected_list)["mediaType"]
    assert listed.media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
    expected_single = await trio.to_thread.run_sync(skopeo_raw, skopeo, v2s2)
    assert single.data == expected_single and single.digest == sha256(expected_single) == served_digest
    assert single.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert json.loads(served)["mediaType"] == "application/vnd.oci.image.manifest.v1+json" != single.media_type


async def test_a_local_layout_and_the_open_images_it_counts(registry_images):
    """An ``oci:`` index as the layout stores it; each call holds an open-image slot only while it runs (more calls
    than the connection's 256 open images all succeed, and an OpenImage after them too)."""
    multi = registry_images.multi
    async with ImageProxy.spawn(extra_args=["--insecure-policy"]) as proxy:
        for _ in range(300):
            raw = await proxy.get_raw_manifest(multi.ref)
        assert await proxy.open_image(multi.ref) > 0
    assert (raw.data, raw.digest, raw.media_type) == (multi.manifest, multi.digest, multi.media_type)


async def test_the_signature_policy_applies(registry_images, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "reject"}]}))
    ref = registry_images.ref("test/multi")
    async with ImageProxy.spawn(extra_args=["--policy", str(policy), INSECURE]) as proxy:
        with pytest.raises(ProxyError, match="rejected by signature policy"):
            await proxy.get_raw_manifest(ref)
        with pytest.raises(ProxyError, match="rejected by signature policy"):
            await proxy.get_raw_manifest(registry_images.multi.ref)


async def test_a_missing_image_is_an_error_naming_it(registry_images):
    ref = registry_images.ref("test/multi", "no-such-tag")
    async with ImageProxy.spawn(extra_args=["--insecure-policy", INSECURE]) as proxy:
        with pytest.raises(ProxyError) as caught:
            await proxy.get_raw_manifest(ref)
        assert await proxy.get_raw_manifest(registry_images.ref("test/multi"))  # the connection carries on
    assert "GetRawManifest" in str(caught.value) and "no-such-tag" in str(caught.value)


async def test_bindings_refuse_a_server_without_the_extension(skopeo_proxy_argv, registry_images):
    async with ImageProxy.spawn(skopeo_proxy_argv, ["--insecure-policy"]) as proxy:
        with pytest.raises(ProxyError, match="does not offer the raw-manifest extension"):
            await proxy.get_raw_manifest(registry_images.multi.ref)
