"""Registry auth: the challenge parser, token fetching and caching, against the real distribution 2.8 registry
(token and htpasswd modes), token-server failures, and where credentials may go (only to the registry and the
realm it names; a 401 from anywhere else is an error, its challenge never kept). ``tests/http/test_redirect_auth.py``
drives the same rules through the registry client."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ErrorCode
from proxy.http.pool import ConnectionPool
from proxy.http.proxies import ProxyConfig
from proxy.http.tls import create_ssl_context
from proxy.registry.auth import (
    MAX_TOKEN_BODY,
    AuthError,
    RegistryAuth,
    UnauthorizedElsewhere,
    answered_elsewhere,
    response_challenges,
    send_authorized,
)
from proxy.registry.challenges import Challenge, Scope, parse_challenges, parse_www_authenticate, pull
from proxy.registry.tokens import parse_token_response
from tests.http.registry import Registry, RegistryOptions, TokenAuth, run_registry, write_htpasswd
from tests.http.server import FAST, Reply, TestServer, redirect, serve
from tests.http.token_issuer import TokenIssuer, serve_issuer

PASSWORD = "s3cret-pässword"
HEADERS = {"Docker-Distribution-API-Version": "registry/2.0", "Accept-Encoding": "identity"}


@attrs.frozen
class Creds:
    username: str
    password: str
    identity_token: str | None = None


ALICE = Creds("alice", PASSWORD)


class FakeClock:
    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_issuer(**kwargs: object) -> TokenIssuer:
    grants = {None: {"public/app": frozenset({"pull"})}, "alice": {"*": frozenset({"pull", "push"})}}
    return TokenIssuer(users={"alice": PASSWORD}, grants=grants, **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def token_registry(tmp_path: Path, issuer: TokenIssuer) -> AsyncIterator[Registry]:
    async with serve_issuer(issuer):
        config = issuer.registry_auth_config(tmp_path / "token-root.pem")
        options = RegistryOptions(token=TokenAuth.from_config(config))
        async with run_registry(tmp_path / "registry", options) as registry:
            yield registry


async def get(
    pool: ConnectionPool, auth: RegistryAuth, url: str, scopes: list[Scope], creds: Creds | None = None
) -> tuple[int, bytes]:
    async with await send_authorized(pool, auth, "GET", url, scopes, creds, HEADERS) as response:
        return response.status, await response.read_all(1 << 16)


# -- the parser ------------------------------------------------------------------------------------------------

PARSED = [
    ("", []),
    ("Basic", [Challenge("basic")]),
    ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
    (
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:ns/app:pull,push"',
        [
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.example/token",
                    "service": "registry.example",
                    "scope": "repository:ns/app:pull,push",
                },
            )
        ],
    ),
    (
        'Basic realm="a, b", BEARER Realm = "x\\"y\\\\z" , error=insufficient_scope',
        [
            Challenge("basic", {"realm": "a, b"}),
            Challenge("bearer", {"realm": 'x"y\\z', "error": "insufficient_scope"}),
        ],
    ),
    (
        'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
        [
            Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
            Challenge("basic", {"realm": "simple"}),
        ],
    ),
    (
        "Negotiate dXNlci9wdw==, Basic realm=x",
        [Challenge("negotiate", {}, "dXNlci9wdw=="), Challenge("basic", {"realm": "x"})],
    ),
    (
        "Bearer realm=https://auth/token?a=b,service=reg",
        [Challenge("bearer", {"realm": "https://auth/token?a=b", "service": "reg"})],
    ),
    ('Bearer realm="first", realm="second"', [Challenge("bearer", {"realm": "first"})]),
    ('Bearer realm="unterminated, service=x', [Challenge("bearer", {"realm": "unterminated, service=x"})]),
    ('realm="no scheme", Basic', [Challenge("basic")]),
    (',,, ;;; "stray" Basic realm="r" @@', [Challenge("basic", {"realm": "r"})]),
    ("Bearer realm=", [Challenge("bearer", {}, "realm=")]),
    ("Bearer error=, realm=r", [Challenge("bearer", {"realm": "r"}, "error=")]),  # token68-shaped, then params
    ("Bearer realm=r, error=", [Challenge("bearer", {"realm": "r", "error": ""})]),
]


@pytest.mark.parametrize(("header", "expected"), PARSED)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_parse_several_header_fields() -> None:
    found = parse_challenges(['Basic realm="a"', 'Bearer realm="b",service="s"'])
    assert [c.scheme for c in found] == ["basic", "bearer"]
    assert found[1].realm == "b" and found[1].service == "s"


@given(st.text(max_size=300))
def test_parser_never_raises(text: str) -> None:
    for challenge in parse_www_authenticate(text):
        assert challenge.scheme == challenge.scheme.lower()
        assert all(name == name.lower() for name in challenge.params)


TOKENS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+!#$%&'*^`|", min_size=1)
VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.lists(st.tuples(TOKENS, st.dictionaries(TOKENS.map(str.lower), VALUES, max_size=4)), max_size=4))
def test_rendered_challenges_round_trip(challenges: list[tuple[str, dict[str, str]]]) -> None:
    rendered = ", ".join(
        scheme + (" " + ", ".join(f"{name}={_quote(value)}" for name, value in params.items()) if params else "")
        for scheme, params in challenges
    )
    parsed = parse_www_authenticate(rendered)
    assert [(c.scheme, c.params) for c in parsed] == [(scheme.lower(), params) for scheme, params in challenges]


def test_scope() -> None:
    assert str(pull("ns/app")) == "repository:ns/app:pull"
    assert str(Scope("ns/app", ("pull", "push"))) == "repository:ns/app:pull,push"
    assert Scope.parse("repository:localhost:5000/app:pull") == Scope("localhost:5000/app", ("pull",))
    assert Scope.parse("registry:catalog:*") == Scope("catalog", ("*",), "registry")
    assert Scope.parse("garbage") is None
    assert Scope.parse_list("repository:a:pull  repository:b:pull,push x") == [pull("a"), Scope("b", ("pull", "push"))]


def test_token_response_lifetimes() -> None:
    now = 1_900_000_000.0
    assert parse_token_response(b'{"token":"t"}', now).expires_at == now + 60
    assert parse_token_response(b'{"token":"t","expires_in":5}', now).expires_at == now + 60
    assert parse_token_response(b'{"access_token":"t","expires_in":300}', now).expires_at == now + 300
    issued = parse_token_response(b'{"token":"t","expires_in":300,"issued_at":"2030-03-17T17:46:30.123456789Z"}', now)
    assert issued.expires_at == pytest.approx(now - 10 + 300, abs=1)  # 2030-03-17T17:46:30Z is now - 10 s
    future = parse_token_response(b'{"token":"t","expires_in":300,"issued_at":"2031-01-01T00:00:00Z"}', now)
    assert future.expires_at == now + 300  # clock skew: count from now
    for bad in (b"", b"[]", b'{"token":""}', b'{"token":"a b"}', b'{"expires_in":300}'):
        with pytest.raises(ValueError) as caught:
            parse_token_response(bad, now)
        assert "a b" not in str(caught.value)


# -- against the real registry in token mode --------------------------------------------------------------------


async def test_anonymous_pull_allowed_and_refused_as_configured(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True)
        status, body = await get(pool, auth, registry.url("/v2/public/app/manifests/latest"), [pull("public/app")])
        assert status == 404 and b"MANIFEST_UNKNOWN" in body  # authorized; the repository is just empty
        status, body = await get(pool, auth, registry.url("/v2/private/app/manifests/latest"), [pull("private/app")])
        assert status == 401 and b"UNAUTHORIZED" in body
    assert all(r.authorization is None and r.user is None for r in issuer.requests)
    assert [r.params("scope") for r in issuer.requests] == [
        ["repository:public/app:pull"],
        ["repository:private/app:pull"],
        ["repository:private/app:pull"],  # the 401 dropped the useless token; the retry got another
    ]


async def test_credentialed_token_is_cached_across_requests(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True)
        scopes = [pull("private/app")]
        status, _ = await get(pool, auth, registry.url("/v2/private/app/manifests/latest"), scopes, ALICE)
        assert status == 404
        status, _ = await get(pool, auth, registry.url("/v2/private/app/blobs/sha256:" + "0" * 64), scopes, ALICE)
        assert status == 404
        status, _ = await get(pool, auth, registry.url("/v2/private/app/manifests/other"), scopes, ALICE)
        assert status == 404
    assert len(issuer.requests) == 1 and auth.token_fetches == 1
    (request,) = issuer.requests
    assert request.user == "alice"
    assert request.authorization == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert request.params("account") == ["alice"] and request.params("service") == [issuer.service]


async def test_concurrent_callers_share_one_fetch(pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with serve_issuer(issuer):
        auth = RegistryAuth("http://127.0.0.1:1", insecure=True)
        challenge = Challenge("bearer", {"realm": issuer.realm(), "service": issuer.service})
        results: list[str | None] = []

        async def one() -> None:
            results.append(await auth.authorization(pool, [challenge], [pull("public/app")]))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert len(set(results)) == 1 and results[0] is not None and results[0].startswith("Bearer ey")
    assert len(issuer.requests) == 1


async def test_token_refreshed_before_it_expires(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer(expires_in=60)
    clock = FakeClock()
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True, clock=clock)
        url = registry.url("/v2/public/app/manifests/latest")
        assert (await get(pool, auth, url, [pull("public/app")]))[0] == 404
        assert len(issuer.requests) == 1
        clock.now += 40  # 20 s left: still good
        assert (await get(pool, auth, url, [pull("public/app")]))[0] == 404
        assert len(issuer.requests) == 1
        clock.now += 15  # 5 s left: inside the refresh margin
        assert (await get(pool, auth, url, [pull("public/app")]))[0] == 404
        assert len(issuer.requests) == 2


async def test_token_the_registry_finds_expired_is_replaced_after_a_401(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True)
        async with pool.request("GET", registry.url("/v2/"), HEADERS) as ping:
            assert ping.status == 401
            auth.challenges = response_challenges(ping)
            await ping.read_all(1 << 16)
        issuer.expired_next = 1  # what a revoked token or a skewed clock looks like to the client
        status, _ = await get(pool, auth, registry.url("/v2/public/app/manifests/latest"), [pull("public/app")])
        assert status == 404
        assert auth.challenges[0].params.get("error") == "invalid_token"
    assert len(issuer.requests) == 2


async def test_insufficient_scope_adds_the_named_scope_first(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True)
        assert (await get(pool, auth, registry.url("/v2/private/app/tags/list"), [pull("private/app")], ALICE))[
            0
        ] == 404
        url = registry.url("/v2/private/app/blobs/uploads/")
        async with await send_authorized(pool, auth, "POST", url, [pull("private/app")], ALICE, HEADERS) as response:
            assert response.status == 202  # upload started: the second token had push
            assert response.headers.get("location")
    assert auth.challenges[0].params["error"] == "insufficient_scope"
    first, second = (r.params("scope") for r in issuer.requests)
    assert first == ["repository:private/app:pull"]
    # the scope the challenge named comes first (its action order is the registry's map order: either)
    named = Scope.parse(second[0])
    assert named is not None and named.repository == "private/app" and set(named.actions) == {"pull", "push"}
    assert second[1:] == ["repository:private/app:pull"]


async def test_kid_header_is_accepted_too(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer(key_by="kid")
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True)
        assert (await get(pool, auth, registry.url("/v2/public/app/manifests/latest"), [pull("public/app")]))[0] == 404


async def test_identity_token_uses_oauth2_and_falls_back_to_get(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer(refresh_tokens={"identity-token-value": "alice"})
    creds = Creds("<token>", "", identity_token="identity-token-value")
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True)
        assert (await get(pool, auth, registry.url("/v2/private/app/manifests/x"), [pull("private/app")], creds))[
            0
        ] == 404
        (post,) = [r for r in issuer.requests if r.method == "POST"]
        assert post.authorization is None and post.user == "alice"  # the identity token identified her
        assert dict(post.form) == {
            "grant_type": "refresh_token",
            "refresh_token": "identity-token-value",
            "service": issuer.service,
            "client_id": "image-proxy",
            "scope": "repository:private/app:pull",
        }
        issuer.requests.clear()
        issuer.oauth2 = False  # a token server without OAuth2: POST gets 404, then an anonymous GET
        auth = RegistryAuth(registry.url("/"), insecure=True)
        assert (await get(pool, auth, registry.url("/v2/public/app/manifests/x"), [pull("public/app")], creds))[
            0
        ] == 404
        assert [(r.method, r.status, r.authorization) for r in issuer.requests[-2:]] == [
            ("POST", 404, None),
            ("GET", 200, None),
        ]


async def test_oauth2_password_grant(tmp_path: Path, pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with token_registry(tmp_path, issuer) as registry:
        auth = RegistryAuth(registry.url("/"), insecure=True, oauth2_password_grant=True)
        assert (await get(pool, auth, registry.url("/v2/private/app/manifests/x"), [pull("private/app")], ALICE))[
            0
        ] == 404
    (post,) = issuer.requests
    assert post.method == "POST" and dict(post.form)["grant_type"] == "password" and post.user == "alice"


async def test_static_registry_token_is_sent_as_is(pool: ConnectionPool) -> None:
    auth = RegistryAuth("https://registry.example", registry_token="static-token")
    challenge = Challenge("bearer", {"realm": "https://auth.example/token"})
    assert await auth.authorization(pool, [challenge], [pull("a")]) == "Bearer static-token"
    assert auth.token_fetches == 0


# -- token server failures -------------------------------------------------------------------------------------


def scripted_auth(registry: str = "https://registry.example:5000") -> RegistryAuth:
    return RegistryAuth(registry, insecure=True)


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True), (401, False), (403, False)])
async def test_token_endpoint_status(server: TestServer, pool: ConnectionPool, status: int, retryable: bool) -> None:
    server.route("/token", Reply(status=status, body=f'{{"details":"bad password {PASSWORD}"}}'.encode()))
    challenge = Challenge("bearer", {"realm": server.url("/token"), "service": "svc"})
    for creds in (None, ALICE):
        with pytest.raises(AuthError) as caught:
            await scripted_auth().authorization(pool, [challenge], [pull("ns/app")], creds)
        error = caught.value
        assert error.retryable is retryable and error.status == status
        assert error.code == (ErrorCode.RETRYABLE if retryable else ErrorCode.OTHER)
        message = str(error)
        assert server.url("/token") in message and "registry.example:5000" in message and str(status) in message
        assert error.credentials_sent is (creds is not None)
        assert ("anonymously" in message) is (creds is None)
        if creds is None:
            assert "bad password" in message  # the body's start is part of the message
        else:
            assert "'alice'" in message and "bad password ***" in message  # the password it echoed is not


async def test_unreachable_token_endpoint_is_retryable(pool: ConnectionPool) -> None:
    async with serve() as gone:
        realm = gone.url("/token")
    challenge = Challenge("bearer", {"realm": realm})
    with pytest.raises(AuthError) as caught:
        await scripted_auth().authorization(pool, [challenge], [pull("ns/app")], ALICE)
    assert caught.value.retryable and caught.value.code == ErrorCode.RETRYABLE
    assert realm in str(caught.value) and PASSWORD not in str(caught.value)


async def test_token_answers_are_size_capped(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/token", Reply(body=b'{"token":"' + b"a" * MAX_TOKEN_BODY + b'"}'))
    with pytest.raises(AuthError, match="too large") as caught:
        await scripted_auth().authorization(pool, [Challenge("bearer", {"realm": server.url("/token")})], [pull("a")])
    assert not caught.value.retryable


async def test_unusable_token_answer(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/token", Reply(body=b'{"expires_in": 300}'))
    with pytest.raises(AuthError, match="no token") as caught:
        await scripted_auth().authorization(pool, [Challenge("bearer", {"realm": server.url("/token")})], [pull("a")])
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("registry", "realm", "insecure", "refused"),
    [
        ("https://registry.example", "http://auth.example/token", False, "plain-http token realm"),
        ("https://registry.example", "ftp://auth.example/token", True, "unusable token realm"),
        ("https://registry.example", "https://user:pw@auth.example/token", True, "unusable token realm"),
        ("https://registry.example", "", True, "without a realm"),
    ],
)
async def test_refused_realms(pool: ConnectionPool, registry: str, realm: str, insecure: bool, refused: str) -> None:
    auth = RegistryAuth(registry, insecure=insecure)
    with pytest.raises(AuthError, match=refused) as caught:
        await auth.authorization(pool, [Challenge("bearer", {"realm": realm} if realm else {})], [pull("a")], ALICE)
    assert not caught.value.retryable and not caught.value.credentials_sent
    assert auth.token_fetches == 0


async def test_http_realm_allowed_for_insecure_and_http_registries(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/token", Reply(body=b'{"token":"abc"}'))
    challenge = Challenge("bearer", {"realm": server.url("/token")})
    for auth in (RegistryAuth("https://registry.example", insecure=True), RegistryAuth("http://registry.example")):
        assert await auth.authorization(pool, [challenge], [pull("a")]) == "Bearer abc"


async def test_basic_challenge(pool: ConnectionPool) -> None:
    auth = RegistryAuth("https://registry.example")
    challenges = [Challenge("unknown"), Challenge("basic", {"realm": "r"})]
    assert await auth.authorization(pool, challenges, [pull("a")]) is None
    expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert await auth.authorization(pool, challenges, [pull("a")], ALICE) == expected
    assert await auth.authorization(pool, [Challenge("negotiate")], [pull("a")], ALICE) is None


# -- htpasswd (basic auth) over TLS -----------------------------------------------------------------------------


async def test_htpasswd_registry_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(tmp_path / "server.crt"), append=True)
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    options = RegistryOptions(
        tls_cert=tmp_path / "server.crt",
        tls_key=tmp_path / "server.key",
        htpasswd=write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD}),
    )

    def context_for(_authority: str) -> ssl.SSLContext:
        context = create_ssl_context(system_trust=False)
        ca.configure_trust(context)
        return context

    async with (
        run_registry(tmp_path / "registry", options) as registry,
        ConnectionPool(FAST, context_for, proxies=ProxyConfig()) as pool,
    ):
        auth = RegistryAuth(registry.url("/"))
        assert await get(pool, auth, registry.url("/v2/"), []) == (
            401,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}\n',
        )
        assert auth.challenges == [Challenge("basic", {"realm": "test-registry"})]
        assert (await get(pool, auth, registry.url("/v2/"), [], Creds("alice", "wrong")))[0] == 401
        assert await get(pool, auth, registry.url("/v2/"), [], ALICE) == (200, b"{}")
        assert auth.token_fetches == 0


# -- where credentials go --------------------------------------------------------------------------------------


async def test_credentials_go_only_to_the_registry_and_its_realm(server: TestServer, pool: ConnectionPool) -> None:
    issuer = make_issuer()
    async with serve_issuer(issuer):
        challenge = f'Bearer realm="{issuer.realm()}",service="{issuer.service}",scope="repository:private/app:pull"'
        blob = "/v2/private/app/blobs/sha256:" + "1" * 64
        server.route(
            blob,
            Reply(status=401, headers=[("WWW-Authenticate", challenge)], body=b"{}"),
            redirect(server.url("/cdn/blob?sig=1", host="localhost"), 307),
        )
        server.route("/cdn/blob", Reply(body=b"blob bytes"))
        auth = RegistryAuth(server.url("/"), insecure=True)
        status, body = await get(pool, auth, server.url(blob), [pull("private/app")], ALICE)
        assert (status, body) == (200, b"blob bytes")
    seen = [(r.target.split("?")[0], r.headers.get("host"), r.headers.get("authorization")) for r in server.requests]
    assert [(target, host) for target, host, _ in seen] == [
        (blob, f"127.0.0.1:{server.port}"),
        (blob, f"127.0.0.1:{server.port}"),
        ("/cdn/blob", f"localhost:{server.port}"),
    ]
    authorizations = [authorization for _, _, authorization in seen]
    assert authorizations[0] is None and authorizations[2] is None
    assert authorizations[1] is not None and authorizations[1].startswith("Bearer ey")
    (token_request,) = issuer.requests
    assert token_request.user == "alice" and token_request.host == f"127.0.0.1:{issuer.port}"
    encoded = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    for request in server.requests:
        assert all(encoded not in value and PASSWORD not in value for value in request.headers.values())


async def test_no_authorization_for_urls_outside_the_registry(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/elsewhere", Reply(body=b"ok"))
    auth = RegistryAuth(server.url("/", host="localhost"), insecure=True)
    auth.challenges = [Challenge("basic", {"realm": "r"})]
    assert await get(pool, auth, server.url("/elsewhere"), [], ALICE) == (200, b"ok")
    assert "authorization" not in server.requests[0].headers


async def test_401_from_a_redirect_target_is_an_error_and_its_challenge_is_never_kept(
    server: TestServer, pool: ConnectionPool
) -> None:
    steal = server.url("/steal", host="localhost")
    server.route("/v2/app/blobs/sha256:1", redirect(server.url("/cdn/blob?sig=1", host="localhost"), 307))
    server.route("/cdn/blob", Reply(status=401, headers=[("WWW-Authenticate", f'Bearer realm="{steal}"')]))
    server.route("/steal", Reply(body=b'{"token":"stolen"}'))
    auth = RegistryAuth(server.url("/"), insecure=True)
    registry_challenge = [Challenge("basic", {"realm": "registry"})]
    auth.challenges = list(registry_challenge)
    for _ in range(2):  # and the next request is authorized as the registry asked, not as the CDN did
        with pytest.raises(UnauthorizedElsewhere) as caught:
            await get(pool, auth, server.url("/v2/app/blobs/sha256:1"), [pull("app")], ALICE)
        assert caught.value.host == f"localhost:{server.port}" and caught.value.status == 401
        assert str(caught.value) == (
            f"localhost:{server.port} (a redirect target of 127.0.0.1:{server.port}) answered 401 Unauthorized; "
            "credentials are sent only to the registry"
        )
        assert auth.challenges == registry_challenge and auth.token_fetches == 0
    targets = [(r.target.split("?")[0], r.headers.get("authorization")) for r in server.requests]
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert targets == [("/v2/app/blobs/sha256:1", basic), ("/cdn/blob", None)] * 2


async def test_401_from_the_registry_reached_again_through_another_host_is_not_answered(
    server: TestServer, pool: ConnectionPool
) -> None:
    server.route("/v2/app/manifests/x", redirect(server.url("/bounce", host="localhost"), 307))
    server.route("/bounce", redirect(server.url("/v2/other/manifests/y"), 307))
    challenge = 'Bearer realm="https://auth.example/token",scope="repository:other:pull,push"'
    server.route("/v2/other/manifests/y", Reply(status=401, headers=[("WWW-Authenticate", challenge)]))
    auth = RegistryAuth(server.url("/"), insecure=True)
    with pytest.raises(UnauthorizedElsewhere, match=r"reached again through a redirect via localhost:\d+"):
        await get(pool, auth, server.url("/v2/app/manifests/x"), [pull("app")], ALICE)
    assert auth.challenges == [] and auth.token_fetches == 0
    assert len(server.requests) == 3  # not sent again with a token for the scope that answer named


@attrs.define
class _Answered:
    url: str
    history: tuple[str, ...] = ()
    status: int = 401


def test_answered_elsewhere() -> None:
    registry = RegistryAuth("https://registry.example:5000").origin
    name = "registry.example:5000"
    here = "https://registry.example:5000/v2/a/blobs/x"
    assert answered_elsewhere(_Answered(here), registry, name) is None  # type: ignore[arg-type]
    same_origin_hop = _Answered("https://registry.example:5000/storage/x", (here,))
    assert answered_elsewhere(same_origin_hop, registry, name) is None  # type: ignore[arg-type]
    for url in (
        "https://registry.example:5001/x",  # another port
        "http://registry.example:5000/x",  # another scheme
        "https://storage.example/x?X-Amz-Signature=secret",
    ):
        found = answered_elsewhere(_Answered(url, (here,)), registry, name)  # type: ignore[arg-type]
        assert found is not None and found.endswith(f"(a redirect target of {name})") and "secret" not in found
    assert answered_elsewhere(_Answered("https://cdn.example:8443/x", (here,)), registry, name) == (  # type: ignore[arg-type]
        f"cdn.example:8443 (a redirect target of {name})"
    )
    back = _Answered(here, (here, "https://cdn.example/x"))
    assert answered_elsewhere(back, registry, name) == f"{name} (reached again through a redirect via cdn.example)"  # type: ignore[arg-type]
    auth = RegistryAuth("https://registry.example:5000")
    assert auth.own_challenges(_Answered("https://cdn.example/x", (here,), status=200)) == []  # type: ignore[arg-type]
