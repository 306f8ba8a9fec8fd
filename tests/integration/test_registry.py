"""The docker:// transport against the real docker-registry, side by side with skopeo's proxy."""

from __future__ import annotations

import hashlib
import json

import pytest

from protocol.client import ImageProxy
from protocol.errors import ErrorCode, ProxyError
from proxy.partial.planner import SMALL_SPAN
from tests.integration.test_differential import (
    assert_five_keys,
    assert_transcripts_agree,
    expect_image,
    read_image,
    run,
    to_image_spec_1_1,
)
from tests.support.images import AMD64, ARM64

INSECURE = ["--tls-verify=false"]
BOB_PASSWORD = "b0b-secret"
BOB = ["--creds", f"bob:{BOB_PASSWORD}"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("repository", "image", "flags"),
    [
        ("test/single", "single", AMD64),
        ("test/v2s2", "v2s2", AMD64),
        ("test/multi", "multi-amd64", AMD64),
        ("test/multi", "multi-arm64", ARM64),
    ],
)
def test_ours_matches_skopeo_on_a_registry(
    repository, image, flags, registry_images, skopeo_proxy_argv, our_proxy_argv
):
    images = registry_images.images
    built = {
        "single": images.single,
        "v2s2": images.v2s2,
        "multi-amd64": images.multi.instances["amd64"],
        "multi-arm64": images.multi.instances["arm64"],
    }[image]
    extra = {"ref": registry_images.ref(repository), "config": (built.config_digest, built.config_size)}
    theirs, _ = run(read_image, [*skopeo_proxy_argv, *INSECURE, *flags], images, extra)
    ours, received = run(read_image, [*our_proxy_argv, *INSECURE, *flags], images, extra)
    assert_five_keys(received)
    expect_image(built, converted=image == "v2s2")({s.label: s for s in ours}, images)
    assert_transcripts_agree(to_image_spec_1_1(theirs), ours)


async def test_every_blob_and_raw_blob_from_the_registry(registry_images):
    big = registry_images.images.big
    async with ImageProxy.spawn(extra_args=INSECURE) as proxy:
        img = await proxy.open_image(registry_images.ref("test/big"))
        digest, _ = await proxy.get_manifest(img)
        assert digest == big.manifest_digest
        layer = big.layers[0]
        assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest
        size, data = await proxy.get_raw_blob(img, layer.digest)
        assert size == layer.size and sha256(data) == layer.digest


async def test_open_image_optional_is_zero_only_for_a_real_manifest_unknown(registry_images):
    async with ImageProxy.spawn(extra_args=INSECURE) as proxy:
        assert await proxy.open_image_optional(registry_images.ref("test/single", "no-such-tag")) is None
        assert await proxy.open_image_optional(registry_images.ref("test/no-such-repo")) is None
        assert await proxy.open_image_optional(registry_images.ref("test/single")) == 1
        with pytest.raises(ProxyError, match="manifest unknown") as info:
            await proxy.open_image(registry_images.ref("test/single", "no-such-tag"))
        assert info.value.code is ErrorCode.OTHER


async def test_unknown_blob_is_an_error_naming_it(registry_images):
    missing = "sha256:" + "0" * 64
    async with ImageProxy.spawn(extra_args=INSECURE) as proxy:
        img = await proxy.open_image(registry_images.ref("test/single"))
        with pytest.raises(ProxyError, match=f"blob {missing} not found"):
            await proxy.get_blob(img, missing, 1)


async def test_plain_http_registry_without_tls_verify_false_says_what_to_do(registry_images):
    async with ImageProxy.spawn() as proxy:
        with pytest.raises(ProxyError, match="--tls-verify=false") as info:
            await proxy.open_image(registry_images.ref("test/single"))
        assert registry_images.registry.authority in str(info.value)


async def test_unreachable_registry_is_retryable_and_names_the_host():
    from tests.http.registry import free_port

    authority = f"127.0.0.1:{free_port()}"
    async with ImageProxy.spawn(extra_args=INSECURE) as proxy:
        with pytest.raises(ProxyError) as info:
            await proxy.open_image(f"docker://{authority}/x/y:latest")
    assert info.value.code is ErrorCode.RETRYABLE
    assert authority in str(info.value)


async def test_docker_schema2_manifest_from_the_registry_converts_like_skopeo(registry_images):
    v2s2 = registry_images.images.v2s2
    async with ImageProxy.spawn(extra_args=INSECURE) as proxy:
        img = await proxy.open_image(registry_images.ref("test/v2s2"))
        digest, manifest = await proxy.get_manifest(img)
        assert digest == v2s2.manifest_digest
        assert json.loads(manifest)["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, built, skopeo):
    """A TLS registry (certificate from a throwaway trustme CA) with htpasswd basic auth, holding test/single."""
    import trustme

    from tests.http.registry import RegistryOptions, write_htpasswd
    from tests.support.images import skopeo_copy
    from tests.support.registry import registry_process

    workdir = tmp_path_factory.mktemp("tls-registry")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "server.key"))
    certs = workdir / "certs"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    htpasswd = write_htpasswd(workdir / "htpasswd", {"bob": BOB_PASSWORD})
    options = RegistryOptions(tls_cert=workdir / "server.pem", tls_key=workdir / "server.key", htpasswd=htpasswd)
    with registry_process(workdir / "registry", options) as registry:
        skopeo_copy(
            f"oci:{built.layout.path}:latest",
            f"docker://{registry.authority}/test/single:latest",
            f"--dest-cert-dir={certs}",
            f"--dest-creds=bob:{BOB_PASSWORD}",
        )
        skopeo_copy(
            f"oci:{built.layout.path}:big",
            f"docker://{registry.authority}/test/big:latest",
            f"--dest-cert-dir={certs}",
            f"--dest-creds=bob:{BOB_PASSWORD}",
        )
        yield registry, certs


async def test_tls_registry_with_cert_dir(tls_registry, built):
    registry, certs = tls_registry
    ref = f"docker://{registry.authority}/test/single:latest"
    async with ImageProxy.spawn(extra_args=["--cert-dir", str(certs), *BOB]) as proxy:
        img = await proxy.open_image(ref)
        assert (await proxy.get_manifest(img))[0] == built.single.manifest_digest
        layer = built.single.layers[-1]
        assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest


async def test_tls_registry_unknown_ca_is_a_final_error_naming_the_host(tls_registry):
    registry, _ = tls_registry
    async with ImageProxy.spawn() as proxy:
        with pytest.raises(ProxyError, match="certificate verify failed") as info:
            await proxy.open_image(f"docker://{registry.authority}/test/single:latest")
    assert info.value.code is ErrorCode.OTHER
    assert registry.authority in str(info.value)


async def test_tls_registry_with_tls_verify_false(tls_registry, built):
    registry, _ = tls_registry
    async with ImageProxy.spawn(extra_args=[*INSECURE, *BOB]) as proxy:
        img = await proxy.open_image(f"docker://{registry.authority}/test/single:latest")
        assert (await proxy.get_manifest(img))[0] == built.single.manifest_digest


async def test_get_blob_at_and_get_raw_blob_over_tls_take_the_streaming_path(tls_registry, built):
    # spans over 1 MiB are streamed from a ranged GET each, read into one buffer as GetBlob's body is
    registry, _ = tls_registry
    layer = built.big.layers[0]
    data = built.big.blob(layer.digest)
    assert layer.size > 2 * SMALL_SPAN, "the spans below must be streamed"
    ranges = [(100, SMALL_SPAN + 5000), (SMALL_SPAN + 6000, layer.size - SMALL_SPAN - 6000), (0, 10)]
    async with ImageProxy.spawn(extra_args=[*INSECURE, *BOB]) as proxy:
        img = await proxy.open_image(f"docker://{registry.authority}/test/big:latest")
        assert await proxy.get_blob_at(img, layer.digest, ranges) == b"".join(data[o : o + n] for o, n in ranges)
        assert await proxy.get_raw_blob(img, layer.digest) == (layer.size, data)


async def test_basic_auth_refusal_says_whether_credentials_were_sent(tls_registry):
    registry, certs = tls_registry
    ref = f"docker://{registry.authority}/test/single:latest"
    async with ImageProxy.spawn(extra_args=["--cert-dir", str(certs)]) as proxy:
        with pytest.raises(ProxyError, match="no credentials were sent"):
            await proxy.open_image(ref)
    async with ImageProxy.spawn(extra_args=["--cert-dir", str(certs), "--creds", "bob:n0t-bobs-password"]) as proxy:
        with pytest.raises(ProxyError, match=r"\(401 Unauthorized.*; credentials were sent\)") as info:
            await proxy.open_image(ref)
    assert "n0t-bobs-password" not in str(info.value)


async def test_tls_registry_ca_from_the_users_certs_d(tls_registry, built, tmp_path, monkeypatch):
    """Without --cert-dir, the CA comes from ~/.config/containers/certs.d/HOST:PORT (containers-certs.d(5))."""
    registry, certs = tls_registry
    host_dir = tmp_path / "home" / ".config" / "containers" / "certs.d" / registry.authority
    host_dir.mkdir(parents=True)
    (host_dir / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with ImageProxy.spawn(extra_args=BOB) as proxy:
        img = await proxy.open_image(f"docker://{registry.authority}/test/single:latest")
        assert (await proxy.get_manifest(img))[0] == built.single.manifest_digest
