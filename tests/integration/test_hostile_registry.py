"""The docker:// transport against a hostile or broken registry (a scripted fake on 127.0.0.1).

Every test asserts a clear error (naming the registry host and what is wrong) or the right lenient behaviour,
and then that the same proxy connection keeps serving: a good image on the same registry still opens and its
manifest and a layer still come through. ``trio.fail_after`` is only a hang guard.

A blob that stalls mid-body is tested with ``--stall-timeout 1`` (resuming it is the stall-proof streaming
issue's; here it must fail FinishPipe, retryable, naming host and offset, within the deadline).
"""

from __future__ import annotations

import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme

from protocol.client import DEFAULT_ARGV, ImageProxy
from protocol.errors import ErrorCode, ProxyError
from proxy.image import manifest as mf
from tests.http.server import Reply, redirect
from tests.support.fake_registry import (
    Blob,
    FakeRegistry,
    Image,
    RawReply,
    compact,
    make_image,
    manifest_reply,
    raw_response,
    serve_registry,
    sha256,
)
from tests.support.images import AMD64

#: a hang guard only: every test here should finish in a few seconds
HANG_GUARD = 30.0
INSECURE = ["--tls-verify=false"]
GOOD_REPO = "good/image"
GOOD = make_image("good", layer_count=2)
MANIFEST_LIMIT = 4 << 20


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    """A plain-HTTP fake registry that also holds a good image, ``good/image:latest``."""
    async with serve_registry() as running:
        running.add_image(GOOD_REPO, "latest", GOOD)
        yield running


@asynccontextmanager
async def spawn(*flags: str, insecure: bool = True) -> AsyncIterator[ImageProxy]:
    async with ImageProxy.spawn(extra_args=[*(INSECURE if insecure else []), *flags]) as proxy:
        yield proxy


async def assert_still_serving(proxy: ImageProxy, registry: FakeRegistry) -> None:
    """The same proxy connection opens the good image and reads its manifest and every layer."""
    image = await proxy.open_image(registry.ref(GOOD_REPO))
    digest, manifest = await proxy.get_manifest(image)
    assert (digest, manifest) == (GOOD.digest, GOOD.manifest)
    for layer in GOOD.layers:
        assert await proxy.get_blob(image, layer.digest, layer.size) == layer.data
    await proxy.close_image(image)


async def open_fails(proxy: ImageProxy, reference: str) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        await proxy.open_image(reference)
    return caught.value


async def get_blob_fails(proxy: ImageProxy, image: int, blob: Blob) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        await proxy.get_blob(image, blob.digest, blob.size)
    return caught.value


def add_image_with_blob_replies(registry: FakeRegistry, repository: str, image: Image, *replies: Reply) -> Blob:
    """``image`` under ``repository:latest``; its first layer answered with ``replies``. Returns that layer."""
    registry.add_image(repository, "latest", image)
    layer = image.layers[0]
    registry.blob(repository, layer.digest, *replies)
    return layer


# ---------------------------------------------------------------- 1. manifests that are not manifests


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        pytest.param(b"<html>this is not JSON</html>", mf.OCI_MANIFEST, "not a JSON object", id="not-json"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00binary", None, "not a JSON object", id="binary"),
        pytest.param(b"[]", mf.OCI_MANIFEST, "not a JSON object", id="json-array"),
        pytest.param(b'"a string"', mf.OCI_MANIFEST, "not a JSON object", id="json-string"),
        pytest.param(b'{"schemaVersion": 2}', mf.OCI_MANIFEST, "config", id="no-config-no-layers"),
        pytest.param(b'{"schemaVersion": 2}', None, "config", id="no-config-no-layers-no-content-type"),
        pytest.param(b"{}", mf.OCI_MANIFEST, "config", id="empty-object"),
    ],
)
async def test_manifest_that_is_not_a_manifest_is_an_error(
    registry: FakeRegistry, body: bytes, content_type: str | None, expected: str
) -> None:
    registry.manifest("bad/image", "latest", manifest_reply(body, content_type))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref("bad/image"))
            assert expected in str(error)
            assert registry.authority in str(error)
            assert error.code is ErrorCode.OTHER
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 2. oversized manifests


def padded_manifest(size: int) -> bytes:
    """A syntactically valid OCI manifest of exactly ``size`` bytes (an annotation pads it)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": GOOD.config.descriptor(),
        "layers": [layer.descriptor() for layer in GOOD.layers],
        "annotations": {"padding": ""},
    }
    base = len(compact(doc))
    doc["annotations"] = {"padding": "x" * (size - base)}
    raw = compact(doc)
    assert len(raw) == size
    return raw


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_manifest_over_the_size_limit_is_an_error_naming_the_limit(
    registry: FakeRegistry, content_length: bool
) -> None:
    registry.manifest("huge/image", "latest", manifest_reply(padded_manifest(5 << 20), content_length=content_length))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref("huge/image"))
            text = str(error)
            assert "too large" in text
            assert str(MANIFEST_LIMIT) in text
            assert registry.authority in text
            if content_length:
                assert str(5 << 20) in text
            assert error.code is ErrorCode.OTHER
            await assert_still_serving(proxy, registry)


async def test_manifest_just_under_the_size_limit_is_accepted(registry: FakeRegistry) -> None:
    raw = padded_manifest(MANIFEST_LIMIT)
    registry.manifest("big/image", "latest", manifest_reply(raw, content_length=False))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            image = await proxy.open_image(registry.ref("big/image"))
            digest, manifest = await proxy.get_manifest(image)
            assert (digest, manifest) == (sha256(raw), raw)
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 3. by-digest pulls that get other bytes


async def test_by_digest_pull_of_other_bytes_names_both_digests(registry: FakeRegistry) -> None:
    wanted, other = make_image("wanted"), make_image("other")
    registry.manifest("pinned/image", wanted.digest, manifest_reply(other.manifest))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref_by_digest("pinned/image", wanted.digest))
            text = str(error)
            assert wanted.digest in text
            assert other.digest in text
            assert registry.authority in text
            await assert_still_serving(proxy, registry)


async def test_list_instance_with_other_bytes_names_both_digests(registry: FakeRegistry) -> None:
    wanted, other = make_image("instance"), make_image("impostor")
    index = compact(
        {
            "schemaVersion": 2,
            "mediaType": mf.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": mf.OCI_MANIFEST,
                    "digest": wanted.digest,
                    "size": len(wanted.manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    )
    registry.manifest("listed/image", "latest", manifest_reply(index, mf.OCI_INDEX))
    registry.manifest("listed/image", wanted.digest, manifest_reply(other.manifest))
    with trio.fail_after(HANG_GUARD):
        async with spawn(*AMD64) as proxy:
            error = await open_fails(proxy, registry.ref("listed/image"))
            text = str(error)
            assert wanted.digest in text
            assert other.digest in text
            assert registry.authority in text
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 4. Content-Type against mediaType


@pytest.mark.parametrize(
    "content_type", [mf.DOCKER_V2S2, mf.OCI_INDEX, mf.DOCKER_V2_LIST], ids=["v2s2", "oci-index", "docker-list"]
)
async def test_content_type_contradicting_media_type_is_an_error(registry: FakeRegistry, content_type: str) -> None:
    registry.manifest("liar/image", "latest", manifest_reply(make_image("liar").manifest, content_type))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref("liar/image"))
            text = str(error)
            assert "Content-Type" in text
            assert content_type in text
            assert mf.OCI_MANIFEST in text
            assert registry.authority in text
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 5. schema1


async def test_schema1_manifest_is_an_unsupported_legacy_type(registry: FakeRegistry) -> None:
    schema1 = compact(
        {
            "schemaVersion": 1,
            "name": "legacy/image",
            "tag": "latest",
            "architecture": "amd64",
            "fsLayers": [{"blobSum": GOOD.layers[0].digest}],
            "history": [{"v1Compatibility": '{"id":"0"}'}],
            "signatures": [
                {"header": {"alg": "ES256"}, "signature": "c2lnbmF0dXJl", "protected": "eyJmb3JtYXRMZW5ndGgiOjB9"}
            ],
        }
    )
    registry.manifest("legacy/image", "latest", manifest_reply(schema1, mf.DOCKER_V2S1_SIGNED))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            with pytest.raises(ProxyError, match="unsupported legacy manifest MIME type") as caught:
                image = await proxy.open_image(registry.ref("legacy/image"))
                await proxy.get_manifest(image)
            assert mf.DOCKER_V2S1_SIGNED in str(caught.value)
            assert registry.authority in str(caught.value)
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 6. redirect loops


async def test_blob_redirecting_to_itself_is_a_redirect_loop(registry: FakeRegistry) -> None:
    image = make_image("self-loop")
    path = registry.blob_path("loop/image", image.layers[0].digest)
    layer = add_image_with_blob_replies(registry, "loop/image", image, redirect(path))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("loop/image"))
            error = await get_blob_fails(proxy, opened, layer)
            assert "redirect loop" in str(error)
            assert registry.authority in str(error)
            assert error.code is ErrorCode.OTHER
            assert len(registry.requests_for(path)) <= 2
            await assert_still_serving(proxy, registry)


async def test_blob_redirecting_between_two_paths_is_a_redirect_loop(registry: FakeRegistry) -> None:
    image = make_image("two-loop")
    layer = add_image_with_blob_replies(registry, "loop/image", image, redirect("/storage/a"))
    registry.server.route("/storage/a", redirect(registry.url("/storage/b"), 307))
    registry.server.route("/storage/b", redirect("/storage/a", 301))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("loop/image"))
            error = await get_blob_fails(proxy, opened, layer)
            text = str(error)
            assert "redirect loop" in text
            assert "/storage/a" in text and "/storage/b" in text
            assert registry.authority in text
            assert len(registry.requests_for("/storage/a")) <= 2
            await assert_still_serving(proxy, registry)


async def test_blob_with_too_many_redirects_is_an_error(registry: FakeRegistry) -> None:
    image = make_image("many-hops")
    layer = add_image_with_blob_replies(registry, "hops/image", image, redirect("/hop/0"))
    for hop in range(30):
        registry.server.route(f"/hop/{hop}", redirect(f"/hop/{hop + 1}"))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("hops/image"))
            error = await get_blob_fails(proxy, opened, layer)
            assert "too many redirects" in str(error)
            assert registry.authority in str(error)
            hops = [r for r in registry.server.requests if r.target.startswith("/hop/")]
            assert 0 < len(hops) <= 12
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 7. https -> http downgrade


def _tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_https_registry_redirecting_a_blob_to_http_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    image = make_image("downgrade")
    layer = image.layers[0]
    async with serve_registry(_tls_server_context(ca)) as tls, serve_registry() as plain:
        tls.add_image(GOOD_REPO, "latest", GOOD)
        plain.add_blob("storage", layer)
        add_image_with_blob_replies(
            tls, "secure/image", image, redirect(plain.url(plain.blob_path("storage", layer.digest)))
        )
        with trio.fail_after(HANG_GUARD):
            async with spawn("--cert-dir", str(certs), insecure=False) as proxy:
                opened = await proxy.open_image(tls.ref("secure/image"))
                error = await get_blob_fails(proxy, opened, layer)
                text = str(error)
                assert "from https to http" in text
                assert tls.authority in text and plain.authority in text
                assert error.code is ErrorCode.OTHER
                assert plain.server.requests == []
                await assert_still_serving(proxy, tls)


# ---------------------------------------------------------------- 8. Content-Encoding: gzip


async def test_gzip_encoded_blob_is_passed_through_as_sent(registry: FakeRegistry) -> None:
    content = b"uncompressed layer bytes\n" * 200
    compressed = gzip.compress(content, mtime=0)
    served = Reply(headers=[("Content-Encoding", "gzip")], body=compressed)
    registry.blob(GOOD_REPO, sha256(compressed), served)
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            image = await proxy.open_image(registry.ref(GOOD_REPO))
            assert await proxy.get_blob(image, sha256(compressed), len(compressed)) == compressed
            size, data = await proxy.get_raw_blob(image, sha256(compressed))
            assert data == compressed and size in (None, len(compressed))
            await assert_still_serving(proxy, registry)
    requests = registry.requests_for(registry.blob_path(GOOD_REPO, sha256(compressed)))
    assert requests
    assert all(r.headers.get("accept-encoding") == "identity" for r in requests)


async def test_gzip_encoded_blob_under_the_uncompressed_digest_is_corrupted(registry: FakeRegistry) -> None:
    content = b"uncompressed layer bytes\n" * 200
    served = Reply(headers=[("Content-Encoding", "gzip")], body=gzip.compress(content, mtime=0))
    registry.blob(GOOD_REPO, sha256(content), served)
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            image = await proxy.open_image(registry.ref(GOOD_REPO))
            with pytest.raises(ProxyError, match=f"corrupted blob, expecting {sha256(content)}"):
                await proxy.get_blob(image, sha256(content), len(content))
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 9. LF-only response head


async def test_lf_only_status_line_and_headers_are_accepted(registry: FakeRegistry) -> None:
    lf = make_image("lf-only")
    registry.add_image("lf/image", "latest", lf)
    registry.manifest("lf/image", "latest", manifest_reply(lf.manifest, lf_only=True))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            image = await proxy.open_image(registry.ref("lf/image"))
            assert await proxy.get_manifest(image) == (lf.digest, lf.manifest)
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 10. server errors, throttling, refusal


async def test_500_then_200_succeeds_after_a_retry(registry: FakeRegistry) -> None:
    flaky = make_image("flaky")
    registry.add_image("flaky/image", "latest", flaky)
    registry.manifest("flaky/image", "latest", Reply(status=500, body=b"oops\n"), manifest_reply(flaky.manifest))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            image = await proxy.open_image(registry.ref("flaky/image"))
            assert await proxy.get_manifest(image) == (flaky.digest, flaky.manifest)
            await assert_still_serving(proxy, registry)
    assert len(registry.requests_for(registry.manifest_path("flaky/image", "latest"))) == 2


async def test_persistent_503_is_a_retryable_error_naming_the_host(registry: FakeRegistry) -> None:
    registry.manifest("down/image", "latest", Reply(status=503, body=b"maintenance\n"))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref("down/image"))
            assert error.code is ErrorCode.RETRYABLE
            assert "503" in str(error)
            assert registry.authority in str(error)
            await assert_still_serving(proxy, registry)
    tries = len(registry.requests_for(registry.manifest_path("down/image", "latest")))
    assert 1 < tries <= 10  # retried, but a bounded number of times


async def test_429_with_retry_after_is_retried_and_succeeds(registry: FakeRegistry) -> None:
    throttled = make_image("throttled")
    registry.add_image("throttled/image", "latest", throttled)
    registry.manifest(
        "throttled/image",
        "latest",
        Reply(status=429, headers=[("Retry-After", "1")], body=b"slow down\n"),
        manifest_reply(throttled.manifest),
    )
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            started = trio.current_time()
            image = await proxy.open_image(registry.ref("throttled/image"))
            assert trio.current_time() - started >= 0.9  # Retry-After was honoured
            assert await proxy.get_manifest(image) == (throttled.digest, throttled.manifest)
            await assert_still_serving(proxy, registry)
    assert len(registry.requests_for(registry.manifest_path("throttled/image", "latest"))) == 2


async def test_401_without_a_challenge_says_access_was_refused(registry: FakeRegistry) -> None:
    registry.manifest("private/image", "latest", Reply(status=401, body=b"go away\n"))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref("private/image"))
            assert "refused access" in str(error)
            assert "401" in str(error)
            assert registry.authority in str(error)
            assert error.code is ErrorCode.OTHER
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 11. a blob that stalls mid-body


async def test_blob_stalling_mid_body_fails_after_the_stall_deadline(registry: FakeRegistry) -> None:
    image = make_image("stall")
    layer = image.layers[0]
    add_image_with_blob_replies(registry, "stall/image", image, Reply(body=layer.data, stall_after=layer.size // 2))
    with trio.fail_after(HANG_GUARD):
        async with spawn("--stall-timeout", "1") as proxy:
            opened = await proxy.open_image(registry.ref("stall/image"))
            error = await get_blob_fails(proxy, opened, layer)
            assert registry.authority in str(error) and f"{layer.size // 2} of {layer.size}" in str(error)
            assert error.code is ErrorCode.RETRYABLE
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 12. bodies that disagree with Content-Length


async def test_blob_cut_short_by_a_closed_connection_fails_finish_pipe(registry: FakeRegistry) -> None:
    image = make_image("short")
    layer = image.layers[0]
    add_image_with_blob_replies(registry, "short/image", image, Reply(body=layer.data, close_after=layer.size // 2))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("short/image"))
            error = await get_blob_fails(proxy, opened, layer)
            assert registry.authority in str(error)
            assert f"{layer.size // 2} of {layer.size}" in str(error)
            with pytest.raises(ProxyError) as raw_error:
                await proxy.get_raw_blob(opened, layer.digest)
            assert registry.authority in str(raw_error.value)
            await assert_still_serving(proxy, registry)


async def test_blob_longer_than_its_content_length_fails_and_the_rest_is_never_a_response(
    registry: FakeRegistry,
) -> None:
    """The registry declares fewer bytes than it sends, and what follows looks like an HTTP response.

    Only the declared bytes are the blob (FinishPipe: corrupted). The surplus is not an answer to anything:
    the connection must not carry another request, or its next response would be the smuggled one."""
    image = make_image("long")
    layer = image.layers[0]
    declared = layer.size - 10
    smuggled_body = b"smuggled layer contents"
    smuggled = raw_response(b"HTTP/1.1 200 OK", [(b"Content-Length", str(len(smuggled_body)).encode())], smuggled_body)
    lying = raw_response(
        b"HTTP/1.1 200 OK",
        [(b"Content-Type", b"application/octet-stream"), (b"Content-Length", str(declared).encode())],
        layer.data + smuggled,
    )
    add_image_with_blob_replies(registry, "long/image", image, RawReply(raw=lying, keep_open=True))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("long/image"))
            with pytest.raises(ProxyError, match=f"corrupted blob, expecting {layer.digest}"):
                await proxy.get_blob(opened, layer.digest, layer.size)
            await assert_still_serving(proxy, registry)


async def test_bytes_after_a_complete_blob_are_never_taken_as_the_next_response(registry: FakeRegistry) -> None:
    """The blob is exactly as long as declared (the pull succeeds), but the registry sends an unsolicited
    response right after it: another manifest. Reusing that connection would answer the next manifest request
    with it, and a pull by tag would then silently open the wrong image."""
    image = make_image("exact")
    layer = image.layers[0]
    evil = make_image("evil")
    unsolicited = raw_response(
        b"HTTP/1.1 200 OK",
        [(b"Content-Type", mf.OCI_MANIFEST.encode()), (b"Content-Length", str(len(evil.manifest)).encode())],
        evil.manifest,
    )
    exact = raw_response(
        b"HTTP/1.1 200 OK",
        [(b"Content-Type", b"application/octet-stream"), (b"Content-Length", str(layer.size).encode())],
        layer.data + unsolicited,
    )
    add_image_with_blob_replies(registry, "exact/image", image, RawReply(raw=exact, keep_open=True))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("exact/image"))
            assert await proxy.get_blob(opened, layer.digest, layer.size) == layer.data
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- 13. huge error bodies


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_huge_404_body_is_not_read_to_the_end(registry: FakeRegistry, content_length: bool) -> None:
    huge = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"' + b"x" * (10 << 20) + b'"}]}'
    registry.manifest("missing/image", "latest", Reply(status=404, body=huge, content_length=content_length))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            error = await open_fails(proxy, registry.ref("missing/image"))
            assert "404" in str(error)
            assert registry.authority in str(error)
            await assert_still_serving(proxy, registry)


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_huge_404_body_that_stalls_does_not_delay_the_error(registry: FakeRegistry, content_length: bool) -> None:
    """The 10 MiB error body stops after 256 KiB: only a client that tries to read it all would wait (for the
    30 s stall deadline); the error must come at once."""
    huge = b"x" * (10 << 20)
    reply = Reply(status=404, body=huge, content_length=content_length, stall_after=256 << 10)
    registry.manifest("missing/image", "latest", reply)
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            started = trio.current_time()
            error = await open_fails(proxy, registry.ref("missing/image"))
            assert trio.current_time() - started < 20  # well under the 30 s stall deadline
            assert "404" in str(error)
            assert registry.authority in str(error)
            await assert_still_serving(proxy, registry)


# ---------------------------------------------------------------- a pull-through proxy's negative cache


async def test_a_404_for_a_blob_the_manifest_names_is_asked_again_after_the_negative_cache(
    registry: FakeRegistry,
) -> None:
    """Kraken-style: 404 while the backend is away. Asked again after more than 1 s, the blob is there."""
    image = make_image("kraken")
    layer = add_image_with_blob_replies(registry, "kraken/image", image, Reply(404), Reply(body=image.layers[0].data))
    with trio.fail_after(HANG_GUARD):
        async with spawn() as proxy:
            opened = await proxy.open_image(registry.ref("kraken/image"))
            started = trio.current_time()
            assert await proxy.get_blob(opened, layer.digest, layer.size) == layer.data
            waited = trio.current_time() - started
    assert len(registry.requests_for(registry.blob_path("kraken/image", layer.digest))) == 2
    assert waited > 1.0, "the second request came after a pull-through proxy's 1 s negative cache"


async def test_a_404_for_a_blob_no_manifest_names_is_final_at_once(registry: FakeRegistry) -> None:
    stranger = Blob(b"not named by any manifest")
    registry.blob(GOOD_REPO, stranger.digest, Reply(404), Reply(body=stranger.data))
    async with spawn() as proxy:
        opened = await proxy.open_image(registry.ref(GOOD_REPO))
        error = await get_blob_fails(proxy, opened, stranger)
        assert "not found" in str(error) and error.code is ErrorCode.OTHER
        await assert_still_serving(proxy, registry)
    assert len(registry.requests_for(registry.blob_path(GOOD_REPO, stranger.digest))) == 1


async def test_a_manifest_body_that_stalls_once_is_fetched_again(registry: FakeRegistry) -> None:
    image = make_image("manifest-stall")
    registry.add_image("mstall/image", "latest", image)
    stalled = manifest_reply(image.manifest)
    stalled.stall_after = len(image.manifest) // 2
    registry.manifest("mstall/image", "latest", stalled, manifest_reply(image.manifest))
    with trio.fail_after(HANG_GUARD):
        async with spawn("--stall-timeout", "1") as proxy:
            opened = await proxy.open_image(registry.ref("mstall/image"))
            assert await proxy.get_manifest(opened) == (image.digest, image.manifest)
    assert len(registry.requests_for(registry.manifest_path("mstall/image", "latest"))) == 2


async def test_stall_timeout_and_max_resumes_from_the_config_file(registry: FakeRegistry, tmp_path: Path) -> None:
    """The daemon's config file sets what the flags set; with max-resumes = 0 a stall fails at once."""
    image = make_image("conf-stall")
    layer = image.layers[0]
    add_image_with_blob_replies(registry, "cstall/image", image, Reply(body=layer.data, stall_after=10))
    conf = tmp_path / "config.toml"
    conf.write_text("[registry]\nstall-timeout = 1\nmax-resumes = 0\n")
    with trio.fail_after(HANG_GUARD):
        async with spawn("--config", str(conf)) as proxy:
            opened = await proxy.open_image(registry.ref("cstall/image"))
            error = await get_blob_fails(proxy, opened, layer)
            assert "after 0 resumes" in str(error) and error.code is ErrorCode.RETRYABLE
    assert len(registry.requests_for(registry.blob_path("cstall/image", layer.digest))) == 1


def test_a_bad_config_file_stops_the_daemon_naming_it(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("[registry]\nstall-timeout = -1\n")
    result = subprocess.run(
        [*DEFAULT_ARGV, "--config", str(conf)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert f"{conf}: [registry] stall-timeout must be a positive number of seconds" in result.stderr
