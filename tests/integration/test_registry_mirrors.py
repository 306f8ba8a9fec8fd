"""registries.conf mirrors against two real registries: the source is chosen per blob, so a mirror that
lacks a blob, or is down, costs nothing but a try, and the pull completes from the primary."""

from __future__ import annotations

import hashlib
import http.client
from pathlib import Path

import pytest

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.http.registry import free_port
from tests.http.server import Reply
from tests.support.fake_registry import serve_registry
from tests.support.images import skopeo_copy
from tests.support.registry import registry_process


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registries_conf(path: Path, primary: str, mirror: str, pull_from_mirror: str | None = None) -> Path:
    only = f'pull-from-mirror = "{pull_from_mirror}"\n' if pull_from_mirror else ""
    path.write_text(
        f'[[registry]]\nprefix = "{primary}"\nlocation = "{primary}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n{only}'
    )
    return path


def blob_requests(log: Path, digest: str) -> list[str]:
    """Access-log lines (one per request: ``"GET /v2/... HTTP/1.1" 200 ...``) of GETs for that blob."""
    return [line for line in log.read_text(errors="replace").splitlines() if '"GET /v2/' in line and digest in line]


@pytest.fixture(scope="module")
def mirror_missing_a_blob(tmp_path_factory, registry_images):
    """A second registry holding test/single, minus its first layer (deleted through the registry API)."""
    built = registry_images.images
    with registry_process(tmp_path_factory.mktemp("mirror")) as mirror:
        skopeo_copy(
            f"oci:{built.layout.path}:latest",
            f"docker://{mirror.authority}/test/single:latest",
            "--dest-tls-verify=false",
        )
        missing = built.single.layers[0].digest
        conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=10)
        conn.request("DELETE", f"/v2/test/single/blobs/{missing}")
        assert conn.getresponse().status == 202
        conn.close()
        yield mirror, missing


async def test_blob_missing_on_the_mirror_comes_from_the_primary(mirror_missing_a_blob, registry_images, tmp_path):
    mirror, missing = mirror_missing_a_blob
    primary = registry_images.registry
    conf = registries_conf(tmp_path / "registries.conf", primary.authority, mirror.authority)
    single = registry_images.single
    async with ImageProxy.spawn(extra_args=["--registries-conf", str(conf)]) as proxy:
        img = await proxy.open_image(registry_images.ref("test/single"))
        assert (await proxy.get_manifest(img))[0] == single.manifest_digest
        for layer in single.layers:
            assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest
    assert any('" 404 ' in line for line in blob_requests(mirror.log, missing)), "the mirror was asked first"
    assert blob_requests(primary.log, missing), "the missing blob came from the primary"
    served_by_mirror = single.layers[1].digest
    assert any('" 200 ' in line for line in blob_requests(mirror.log, served_by_mirror))


async def test_a_mirror_that_is_down_is_passed_over(registry_images, tmp_path):
    conf = registries_conf(tmp_path / "registries.conf", registry_images.registry.authority, f"127.0.0.1:{free_port()}")
    single = registry_images.single
    async with ImageProxy.spawn(extra_args=["--registries-conf", str(conf)]) as proxy:
        img = await proxy.open_image(registry_images.ref("test/single"))
        assert (await proxy.get_manifest(img))[0] == single.manifest_digest
        layer = single.layers[-1]
        assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest


async def test_blocked_registry_is_refused_by_name(registry_images, tmp_path):
    authority = registry_images.registry.authority
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nprefix = "{authority}"\nlocation = "{authority}"\nblocked = true\n')
    async with ImageProxy.spawn(extra_args=["--registries-conf", str(conf), "--tls-verify=false"]) as proxy:
        with pytest.raises(ProxyError, match="blocked"):
            await proxy.open_image(registry_images.ref("test/single"))


async def test_broken_registries_conf_fails_docker_opens_with_its_reason(registry_images, single, tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text("[[registry]\nthis is not toml")
    async with ImageProxy.spawn(extra_args=["--registries-conf", str(conf)]) as proxy:
        with pytest.raises(ProxyError, match=str(conf)):
            await proxy.open_image(registry_images.ref("test/single"))
        # local transports keep working
        assert await proxy.open_image(single.ref) == 1


async def test_a_mirror_answering_404_or_500_for_a_while_is_not_believed_nor_remembered(registry_images, tmp_path):
    """The Kraken case: a mirror answers 404 ("backend unavailable") for one blob and 500 for another. The first
    pull gets both from the primary; the next pull asks the mirror again (nothing negative was cached) and now
    gets them there."""
    single = registry_images.single
    primary = registry_images.registry
    kraken, flaky = single.layers[0], single.layers[1]
    async with serve_registry() as mirror:
        reply = Reply(headers=[("Content-Type", single.manifest_media_type)], body=single.manifest)
        mirror.manifest("test/single", "latest", reply)
        for digest, first in (
            (kraken.digest, Reply(status=404, body=b"backend unavailable")),
            (flaky.digest, Reply(500)),
        ):
            mirror.blob("test/single", digest, first, Reply(body=single.blob(digest)))
        for layer in single.layers[2:]:
            mirror.blob("test/single", layer.digest, Reply(body=single.blob(layer.digest)))
        conf = registries_conf(tmp_path / "registries.conf", primary.authority, mirror.authority)
        before = {d: len(blob_requests(primary.log, d)) for d in (kraken.digest, flaky.digest)}
        async with ImageProxy.spawn(extra_args=["--registries-conf", str(conf)]) as proxy:
            for _ in range(2):
                img = await proxy.open_image(registry_images.ref("test/single"))
                assert (await proxy.get_manifest(img))[0] == single.manifest_digest
                for layer in single.layers:
                    assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest
                await proxy.close_image(img)
        for digest in (kraken.digest, flaky.digest):
            # the mirror's script answers the first request with 404/500 and later ones with the blob
            asked = mirror.requests_for(mirror.blob_path("test/single", digest))
            assert len(asked) == 2, "asked once per pull: the failure was neither retried at once nor remembered"
            assert len(blob_requests(primary.log, digest)) == before[digest] + 1, "exactly one pull used the primary"


async def test_a_mirrors_manifest_does_not_unlock_what_the_primary_put_in_the_cache(registry_images, tmp_path):
    """registries.conf sends digest references to a mirror (``pull-from-mirror = "digest-only"``) that serves anyone
    a manifest for the name. One client pulls test/single by tag from the primary into the shared blob cache; another
    opens the same name by the digest of a manifest the mirror made up, naming that image's layer. Its GetBlob is not
    served from the cache (the mirror's manifest shows access to the mirror's repository, not the primary's): it is
    asked of the mirror (404), then of the primary, which sees the request."""
    from proxy.image import manifest as mf
    from tests.support.fake_registry import compact, manifest_reply, serve_registry

    primary = registry_images.registry
    single = registry_images.single
    layer = single.layers[0]
    made_up = compact(
        {
            "schemaVersion": 2,
            "mediaType": mf.OCI_MANIFEST,
            "config": {"mediaType": mf.OCI_CONFIG, "digest": single.config_digest, "size": single.config_size},
            "layers": [{"mediaType": mf.OCI_LAYER, "digest": layer.digest, "size": layer.size}],
        }
    )
    cache = tmp_path / "cache"
    async with serve_registry() as mirror:
        mirror.manifest("test/single", sha256(made_up), manifest_reply(made_up))
        conf = registries_conf(tmp_path / "registries.conf", primary.authority, mirror.authority, "digest-only")
        flags = ["--registries-conf", str(conf), "--blob-cache", str(cache)]
        async with ImageProxy.spawn(extra_args=flags) as victim:
            img = await victim.open_image(registry_images.ref("test/single"))
            assert sha256(await victim.get_blob(img, layer.digest, layer.size)) == layer.digest
        asked_before = len(blob_requests(primary.log, layer.digest))
        async with ImageProxy.spawn(extra_args=flags) as other:
            img = await other.open_image(f"docker://{primary.authority}/test/single@{sha256(made_up)}")
            assert sha256(await other.get_blob(img, layer.digest, layer.size)) == layer.digest
        assert mirror.requests_for(mirror.blob_path("test/single", layer.digest)), "the mirror was asked first"
    assert len(blob_requests(primary.log, layer.digest)) > asked_before, (
        "asked of the primary, not taken from the cache"
    )
