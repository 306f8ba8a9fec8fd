"""Challenges come only from the registry (issue 14, part 2).

A registry redirects blob GETs (307) to a storage host on another port; the storage host answers 401 with a
Bearer challenge whose realm is a "steal" endpoint it serves, or 200 with the blob. Through the real
``RegistryClient`` / ``RegistrySource`` (and once end to end through a spawned proxy), the storage host and the
steal endpoint must never see the registry's credentials or tokens, the error must name the storage host, and
the next request to another repository must authenticate with the registry's own challenge. The token realm the
registry names on another host gets the credentials (allowed); a redirect from it to a third host does not; a
lookaside server never gets registry credentials and its 401 is an error naming it.

Assertions are on what each fake received (its parsed requests, and ``received``: every byte it read).
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from proxy.config import Credentials, CredentialSource
from proxy.http.pool import ConnectionPool
from proxy.http.proxies import ProxyConfig
from proxy.image.reference import parse_docker_reference
from proxy.policy.registries_d import Namespace, RegistriesD
from proxy.policy.signatures import SignatureFetchError, SignatureReader
from proxy.registry.auth import AuthError
from proxy.registry.client import RegistryClient, RegistrySettings
from proxy.registry.source import RegistrySource, open_registry
from proxy.sources.base import SourceError
from tests.http.server import FAST, Recorded, Reply, TestServer, redirect, serve
from tests.http.token_issuer import TokenIssuer, serve_issuer
from tests.support.fake_registry import FakeRegistry, make_image, serve_registry

USER = "alice"
PASSWORD = "s3cret-pass-7f3a"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
#: what must never reach a storage host, a steal endpoint, a lookaside server or a realm's redirect target
SECRETS = (BASIC.split()[1].encode(), PASSWORD.encode())
STOLEN = b'{"token":"stolen-token","expires_in":300}'
#: a hang guard only
HANG_GUARD = 30.0

REDIRECTED = make_image("redirected")  # its layer is served by the storage host
OTHER = make_image("other")  # another repository, served by the registry itself


def repository_of(target: str) -> str | None:
    found = re.match(r"/v2/(.+)/(?:manifests|blobs)/", target)
    return found.group(1) if found else None


def basic_gate(request: Recorded) -> Reply | None:
    """A registry with htpasswd auth: 401 + Basic challenge unless alice's credentials came."""
    if request.headers.get("authorization") == BASIC:
        return None
    return Reply(status=401, headers=[("WWW-Authenticate", 'Basic realm="fake-registry"')], body=b"{}")


def bearer_gate(issuer: TokenIssuer, realm: Callable[[], str]) -> Callable[[Recorded], Reply | None]:
    """A registry with token auth: a token alice got from ``issuer`` for the repository, else 401 + challenge."""

    def gate(request: Recorded) -> Reply | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        issued = issuer.issued.get(token) if scheme == "Bearer" else None
        repository = repository_of(request.target)
        wanted = repository is None or f"repository:{repository}:pull" in (issued.scopes if issued else ())
        if issued is not None and issued.user == USER and wanted:
            return None
        challenge = f'Bearer realm="{realm()}",service="{issuer.service}"'
        if repository is not None:
            challenge += f',scope="repository:{repository}:pull"'
        return Reply(status=401, headers=[("WWW-Authenticate", challenge)], body=b"{}")

    return gate


@attrs.define
class Scene:
    registry: FakeRegistry
    storage: TestServer
    issuer: TokenIssuer | None
    client: RegistryClient

    @property
    def storage_host(self) -> str:
        return f"127.0.0.1:{self.storage.port}"

    def blob_path(self) -> str:
        return f"/storage/{REDIRECTED.layers[0].digest}"

    def storage_answers_401(self) -> None:
        challenge = f'Bearer realm="{self.storage.url("/steal")}",service="storage"'
        self.storage.route(self.blob_path(), Reply(status=401, headers=[("WWW-Authenticate", challenge)], body=b"{}"))

    def storage_serves_the_blob(self) -> None:
        self.storage.route(self.blob_path(), Reply(body=REDIRECTED.layers[0].data))

    async def open(self, repository: str) -> RegistrySource:
        reference = self.registry.ref(repository)
        return await open_registry(reference, reference.removeprefix("docker:"), self.client)

    def assert_storage_saw_no_credentials(self) -> None:
        received = bytes(self.storage.received)
        assert b"authorization" not in received.lower(), received
        assert b"cookie" not in received.lower()
        for secret in (*SECRETS, *self.tokens()):
            assert secret not in received
        assert self.storage.requested("/steal") == [], "the storage host's realm was asked for a token"

    def tokens(self) -> list[bytes]:
        return [token.encode() for token in self.issuer.issued] if self.issuer is not None else []

    def registry_authorizations(self, repository: str) -> list[str | None]:
        return [
            r.headers.get("authorization")
            for r in self.registry.server.requests
            if repository_of(r.target) == repository
        ]


def make_client() -> RegistryClient:
    settings = RegistrySettings(tls_verify=False, timeouts=FAST)
    client = RegistryClient(settings, CredentialSource(explicit=Credentials(USER, PASSWORD)))
    client.pool = ConnectionPool(FAST, client._ssl_context, proxies=ProxyConfig())  # hermetic: no ambient proxies
    return client


@asynccontextmanager
async def scene(auth: str) -> AsyncIterator[Scene]:
    """A registry requiring ``auth`` ("basic" or "bearer", the token realm on a host of its own) whose
    ``redirected`` repository sends its layer to the storage host (307, with a presigned-looking query)."""
    issuer = TokenIssuer(users={USER: PASSWORD}, grants={USER: {"*": frozenset({"pull"})}})
    with trio.fail_after(HANG_GUARD):
        async with serve_registry() as registry, serve() as storage, serve_issuer(issuer):
            registry.server.gate = basic_gate if auth == "basic" else bearer_gate(issuer, issuer.realm)
            registry.add_image("redirected", "latest", REDIRECTED)
            layer = REDIRECTED.layers[0]
            location = storage.url(f"/storage/{layer.digest}?X-Amz-Signature=presigned")
            registry.blob("redirected", layer.digest, redirect(location, 307))
            registry.add_image("other", "latest", OTHER)
            storage.route("/steal", Reply(headers=[("Content-Type", "application/json")], body=STOLEN))
            client = make_client()
            try:
                yield Scene(registry, storage, issuer if auth == "bearer" else None, client)
            finally:
                await client.aclose()


async def read_blob(source: RegistrySource, digest: str) -> bytes:
    blob = await source.open_blob(digest)
    chunks = []
    async with blob:
        while chunk := await blob.read(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


async def assert_other_repository_authenticates(scene: Scene) -> None:
    """The next image, in another repository, opens with the registry's own challenge and credentials."""
    source = await scene.open("other")
    raw, _ = await source.get_manifest()
    assert raw == OTHER.manifest
    assert await read_blob(source, OTHER.layers[0].digest) == OTHER.layers[0].data
    authorizations = scene.registry_authorizations("other")
    assert authorizations and authorizations[-1] is not None
    if scene.issuer is None:
        assert authorizations[-1] == BASIC
    else:
        token = authorizations[-1].removeprefix("Bearer ")
        issued = scene.issuer.issued[token]
        assert issued.user == USER and "repository:other:pull" in issued.scopes
    assert scene.storage.requested("/steal") == []


# -- a redirect target answering 401 -----------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_storage_401_is_an_error_naming_it_and_never_gets_credentials(auth: str) -> None:
    async with scene(auth) as s:
        s.storage_answers_401()
        source = await s.open("redirected")
        assert (await source.get_manifest())[0] == REDIRECTED.manifest
        with pytest.raises(SourceError) as caught:
            await read_blob(source, REDIRECTED.layers[0].digest)
        s.assert_storage_saw_no_credentials()
        text = str(caught.value)
        assert f"fetching blob {REDIRECTED.layers[0].digest}" in text, text
        assert (
            f"{s.storage_host} (a redirect target of {s.registry.authority}) answered 401 Unauthorized; "
            "credentials are sent only to the registry"
        ) in text
        assert PASSWORD not in text and "presigned" not in text
        s.assert_storage_saw_no_credentials()
        assert len(s.storage.requested(s.blob_path())) == 1, "the storage host's challenge was answered"
        # the registry's own challenge is what the client keeps
        (challenge,) = s.client._endpoints[s.registry.authority].auth.challenges
        assert challenge.realm == ("fake-registry" if auth == "basic" else s.issuer.realm())
        await assert_other_repository_authenticates(s)
        s.assert_storage_saw_no_credentials()
        if s.issuer is not None:
            # the realm the registry named, on another host, got the credentials: that is allowed
            assert s.issuer.requests and all(
                r.authorization == BASIC and r.user == USER and r.status == 200 for r in s.issuer.requests
            )


@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_storage_serving_the_blob_gets_no_credentials(auth: str) -> None:
    async with scene(auth) as s:
        s.storage_serves_the_blob()
        source = await s.open("redirected")
        assert await read_blob(source, REDIRECTED.layers[0].digest) == REDIRECTED.layers[0].data
        (request,) = s.storage.requested(s.blob_path())
        assert request.target.endswith("?X-Amz-Signature=presigned")
        s.assert_storage_saw_no_credentials()
        # while the registry got them on the request it redirected
        assert all(a is not None for a in s.registry_authorizations("redirected")[-1:])


async def test_storage_403_names_the_storage_host_not_the_registry() -> None:
    async with scene("basic") as s:
        s.storage.route(s.blob_path(), Reply(status=403, body=b"<Error><Code>AccessDenied</Code></Error>"))
        source = await s.open("redirected")
        with pytest.raises(SourceError) as caught:
            await read_blob(source, REDIRECTED.layers[0].digest)
        text = str(caught.value)
        assert (f"{s.storage_host} (a redirect target of {s.registry.authority}) refused access (403") in text, text
        assert f"registry {s.registry.authority} refused access" not in text
        s.assert_storage_saw_no_credentials()


@pytest.mark.parametrize("back_to", ["127.0.0.1", "localhost"])
async def test_storage_bouncing_back_to_a_registry_looking_host_gets_no_credentials(back_to: str) -> None:
    """registry -> storage -> the registry's own origin, or the same server named ``localhost`` (another host as
    far as the client can tell): no hop after the registry carries Authorization, and the 401 at the end is an
    error, not a challenge to answer."""
    async with scene("basic") as s:
        bounced = f"/bounced/{REDIRECTED.layers[0].digest}"
        s.storage.route(s.blob_path(), redirect(s.registry.server.url(bounced, host=back_to), 307))
        source = await s.open("redirected")
        with pytest.raises(SourceError) as caught:
            await read_blob(source, REDIRECTED.layers[0].digest)
        text = str(caught.value)
        if back_to == "localhost":
            expected = f"localhost:{s.registry.port} (a redirect target of {s.registry.authority}) answered 401"
        else:
            expected = f"{s.registry.authority} (reached again through a redirect via {s.storage_host}) answered 401"
        assert expected in text, text
        bounces = s.registry.server.requested(bounced)
        assert len(bounces) == 1 and "authorization" not in bounces[0].headers
        s.assert_storage_saw_no_credentials()
        await assert_other_repository_authenticates(s)


# -- the token realm ---------------------------------------------------------------------------------------------


async def test_a_redirect_from_the_token_realm_to_a_third_host_gets_no_credentials() -> None:
    """The realm the registry names (another host) gets the credentials; where it redirects does not, and that
    host's 401 (with a challenge of its own) is reported as its answer, not as wrong credentials."""
    issuer = TokenIssuer(users={USER: PASSWORD}, grants={USER: {"*": frozenset({"pull"})}})
    with trio.fail_after(HANG_GUARD):
        async with serve_registry() as registry, serve() as realm, serve() as third:
            registry.server.gate = bearer_gate(issuer, lambda: realm.url("/token"))
            registry.add_image("other", "latest", OTHER)
            realm.route("/token", redirect(third.url("/token"), 307))
            challenge = f'Bearer realm="{third.url("/steal")}"'
            third.route("/token", Reply(status=401, headers=[("WWW-Authenticate", challenge)], body=b"{}"))
            third.route("/steal", Reply(body=STOLEN))
            client = make_client()
            try:
                reference = registry.ref("other")
                source = await open_registry(reference, reference.removeprefix("docker:"), client)
                with pytest.raises(AuthError) as caught:
                    await source.get_manifest()
            finally:
                await client.aclose()
    text = str(caught.value)
    assert (
        f"127.0.0.1:{third.port} (a redirect target of token server {realm.url('/token')}) "
        f"for registry {registry.authority} answered 401"
    ) in text, text
    assert "check the credentials" not in text and PASSWORD not in text
    (asked,) = realm.requested("/token")
    assert asked.headers.get("authorization") == BASIC  # the realm the registry named: allowed
    assert len(third.requested("/token")) == 1 and third.requested("/steal") == []
    received = bytes(third.received)
    assert b"authorization" not in received.lower()
    assert all(secret not in received for secret in SECRETS)


# -- lookaside signatures ----------------------------------------------------------------------------------------


async def signatures_from(scene: Scene, lookaside: str) -> SignatureFetchError:
    """Open the ``other`` image (authenticating to the registry), then read its lookaside signatures."""
    source = await scene.open("other")
    await source.get_manifest()  # the client now holds the registry's challenge and sends credentials
    reference = parse_docker_reference(f"{scene.registry.authority}/other:latest")
    registries_d = RegistriesD(docker={scene.registry.authority: Namespace(lookaside=lookaside)})
    reader = SignatureReader(source, reference, scene.client, registries_d, None)
    with pytest.raises(SignatureFetchError) as caught:
        await reader.signatures(OTHER.digest, instance=False)
    return caught.value


def lookaside_401(server: TestServer) -> Reply:
    challenge = f'Bearer realm="{server.url("/steal")}",service="lookaside", Basic realm="lookaside"'
    return Reply(status=401, headers=[("WWW-Authenticate", challenge)], body=b"{}")


@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_lookaside_401_is_an_error_naming_it_and_never_gets_registry_credentials(auth: str) -> None:
    async with scene(auth) as s, serve() as lookaside:
        signature = f"/sigs/other@{OTHER.digest.replace(':', '=')}/signature-1"
        lookaside.route(signature, lookaside_401(lookaside))
        lookaside.route("/steal", Reply(body=STOLEN))
        error = await signatures_from(s, lookaside.url("/sigs"))
        assert (
            f"127.0.0.1:{lookaside.port} answered 401 Unauthorized; "
            "registry credentials are never sent to a lookaside server"
        ) in str(error), str(error)
        assert len(lookaside.requested(signature)) == 1 and lookaside.requested("/steal") == []
        received = bytes(lookaside.received)
        assert b"authorization" not in received.lower()
        for secret in (*SECRETS, *s.tokens()):
            assert secret not in received
        assert s.registry_authorizations("other")[-1] is not None  # the registry did get them


async def test_lookaside_url_credentials_go_to_it_alone_not_to_its_redirect_target() -> None:
    async with scene("basic") as s, serve() as lookaside, serve() as target:
        signature = f"/sigs/other@{OTHER.digest.replace(':', '=')}/signature-1"
        lookaside.route(signature, lookaside_401(lookaside))
        base = lookaside.url("/sigs").replace("http://", "http://sig-user:sig-pass@")
        error = await signatures_from(s, base)
        assert f"127.0.0.1:{lookaside.port} answered 401 Unauthorized to the credentials in the lookaside URL" in str(
            error
        )
        (asked,) = lookaside.requested(signature)
        assert asked.headers.get("authorization") == "Basic " + base64.b64encode(b"sig-user:sig-pass").decode()
        assert all(secret not in bytes(lookaside.received) for secret in SECRETS)

        # redirected elsewhere, neither the lookaside's own credentials nor the registry's follow
        lookaside.route(signature, redirect(target.url("/elsewhere"), 307))
        target.route("/elsewhere", lookaside_401(target))
        reader_error = await signatures_from(s, base)
        assert (
            f"127.0.0.1:{target.port} (a redirect target of 127.0.0.1:{lookaside.port}) answered 401 Unauthorized"
        ) in str(reader_error), str(reader_error)
        assert b"authorization" not in bytes(target.received).lower()
        assert all(secret not in bytes(target.received) for secret in (*SECRETS, b"sig-pass"))


# -- end to end --------------------------------------------------------------------------------------------------


async def test_end_to_end_through_a_spawned_proxy() -> None:
    """``--creds`` and ``--tls-verify=false`` as skopeo is run: OpenImage + GetBlob of a layer the registry
    redirects to a storage host answering 401; then another repository of the same registry still pulls."""
    async with scene("basic") as s:
        s.storage_answers_401()
        layer = REDIRECTED.layers[0]
        flags = ["--tls-verify=false", "--creds", f"{USER}:{PASSWORD}"]
        with trio.fail_after(HANG_GUARD):
            async with ImageProxy.spawn(extra_args=flags) as proxy:
                image = await proxy.open_image(s.registry.ref("redirected"))
                with pytest.raises(ProxyError) as caught:
                    await proxy.get_blob(image, layer.digest, layer.size)
                other = await proxy.open_image(s.registry.ref("other"))
                assert (await proxy.get_manifest(other))[1] == OTHER.manifest
                assert await proxy.get_blob(other, OTHER.layers[0].digest, OTHER.layers[0].size) == (
                    OTHER.layers[0].data
                )
        s.assert_storage_saw_no_credentials()
        text = str(caught.value)
        assert f"{s.storage_host} (a redirect target of {s.registry.authority}) answered 401 Unauthorized" in text
        assert PASSWORD not in text
        assert s.registry_authorizations("other")[-1] == BASIC
