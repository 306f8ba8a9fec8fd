"""Redirects: followed for GET/HEAD, Authorization, Proxy-Authorization and Cookie dropped across origins (and never
back), no downgrade, no loops."""

from __future__ import annotations

import pytest

from proxy.http.errors import RedirectError
from proxy.http.headers import Headers
from proxy.http.pool import ConnectionPool
from proxy.http.redirects import request_following_redirects
from tests.http.server import Reply, TestServer, redirect, serve

AUTH = {"Authorization": "Bearer secret", "Accept": "application/json"}


async def test_same_origin_redirect_keeps_authorization(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/v2/x/blobs/sha256:1", redirect("/storage/1", 307))
    server.route("/storage/1", Reply(body=b"blob"))
    response = await request_following_redirects(pool, "GET", server.url("/v2/x/blobs/sha256:1"), AUTH)
    async with response:
        assert await response.read_all(10) == b"blob"
    assert response.url == server.url("/storage/1")
    assert response.history == (server.url("/v2/x/blobs/sha256:1"),)
    assert [r.headers.get("authorization") for r in server.requests] == ["Bearer secret", "Bearer secret"]
    assert server.connections == 1  # the redirect's small body was drained, the connection reused


async def test_authorization_dropped_across_hosts_and_stays_dropped(server: TestServer, pool: ConnectionPool) -> None:
    # 127.0.0.1 and localhost are two hosts as far as the client is concerned
    server.route("/v2/blob", redirect(server.url("/cdn/blob", host="localhost")))
    server.route("/cdn/blob", redirect(server.url("/final")))
    server.route("/final", Reply(body=b"data"))
    async with await request_following_redirects(pool, "GET", server.url("/v2/blob"), AUTH) as response:
        assert await response.read_all(10) == b"data"
    seen = [(r.target, r.headers.get("authorization"), r.headers.get("host")) for r in server.requests]
    assert seen == [
        ("/v2/blob", "Bearer secret", f"127.0.0.1:{server.port}"),
        ("/cdn/blob", None, f"localhost:{server.port}"),
        ("/final", None, f"127.0.0.1:{server.port}"),
    ]
    assert all(r.headers.get("accept") == "application/json" for r in server.requests)


async def test_port_change_drops_authorization(server: TestServer, pool: ConnectionPool) -> None:
    async with serve() as other:
        other.route("/x", Reply(body=b"ok"))
        server.route("/", redirect(other.url("/x"), 301))
        async with await request_following_redirects(pool, "GET", server.url("/"), AUTH) as response:
            assert await response.read_all(10) == b"ok"
        assert "authorization" not in other.requests[0].headers


async def test_head_follows_303(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/a", redirect("/b", 303))
    server.route("/b", Reply(body=b"12345"))
    async with await request_following_redirects(pool, "HEAD", server.url("/a")) as response:
        assert response.status == 200
        assert response.content_length == 5
    assert [r.method for r in server.requests] == ["HEAD", "HEAD"]


async def test_other_methods_and_missing_location_are_not_followed(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/upload", redirect("/elsewhere", 307))
    server.route("/odd", Reply(status=302))
    async with await request_following_redirects(pool, "POST", server.url("/upload")) as response:
        assert response.status == 307
        assert response.headers.get("location") == "/elsewhere"
    async with await request_following_redirects(pool, "GET", server.url("/odd")) as response:
        assert response.status == 302
    assert len(server.requests) == 2


async def test_redirect_loop_names_the_chain(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/a", redirect("/b"))
    server.route("/b", redirect("/a"))
    with pytest.raises(RedirectError, match="redirect loop") as caught:
        await request_following_redirects(pool, "GET", server.url("/a"))
    assert caught.value.chain == (server.url("/a"), server.url("/b"), server.url("/a"))
    assert f"{server.url('/a')} -> {server.url('/b')} -> {server.url('/a')}" in str(caught.value)
    assert not caught.value.retryable


async def test_too_many_hops(server: TestServer, pool: ConnectionPool) -> None:
    for i in range(10):
        server.route(f"/hop{i}", redirect(f"/hop{i + 1}"))
    with pytest.raises(RedirectError, match=r"too many redirects \(more than 3\)") as caught:
        await request_following_redirects(pool, "GET", server.url("/hop0"), max_hops=3)
    assert len(caught.value.chain) == 5
    assert len(server.requests) == 4
    # and exactly max_hops redirects are fine
    async with await request_following_redirects(pool, "GET", server.url("/hop7"), max_hops=3) as response:
        assert response.status == 404  # /hop10 is not routed
        assert len(response.history) == 3


async def test_bad_location(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/", redirect("ftp://example.com/file"))
    with pytest.raises(RedirectError, match="invalid redirect Location"):
        await request_following_redirects(pool, "GET", server.url("/"))


# -- what a redirect carries to another origin ------------------------------------------------------------------

CREDENTIALED = {
    "Authorization": "Bearer secret",
    "Proxy-Authorization": "Basic cHJveHk6cHc=",
    "Cookie": "session=registry-only",
    "Accept": "application/json",
}
CREDENTIAL_FIELDS = ("authorization", "proxy-authorization", "cookie")


async def test_same_origin_redirect_keeps_cookie_and_proxy_auth(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/a", redirect("/b", 307))
    server.route("/b", Reply(body=b"ok"))
    async with await request_following_redirects(pool, "GET", server.url("/a"), CREDENTIALED) as response:
        assert await response.read_all(10) == b"ok"
    for request in server.requests:
        assert [request.headers.get(name) for name in CREDENTIAL_FIELDS] == [
            "Bearer secret",
            "Basic cHJveHk6cHc=",
            "session=registry-only",
        ]


@pytest.mark.parametrize("back_to", ["127.0.0.1", "localhost"])
async def test_chain_registry_storage_registry_looking_host_carries_no_credentials(
    server: TestServer, pool: ConnectionPool, back_to: str
) -> None:
    """registry -> storage (another port) -> the registry's own origin, or its server named differently:
    Authorization, Proxy-Authorization and Cookie leave with the first hop and never come back."""
    async with serve() as storage:
        server.route("/v2/blob", redirect(storage.url("/storage/blob?sig=1"), 307))
        storage.route("/storage/blob", redirect(server.url("/final", host=back_to), 307))
        server.route("/final", Reply(body=b"data"))
        async with await request_following_redirects(pool, "GET", server.url("/v2/blob"), CREDENTIALED) as response:
            assert await response.read_all(10) == b"data"
        assert response.history == (server.url("/v2/blob"), storage.url("/storage/blob?sig=1"))
        (first, final) = server.requests
        assert first.headers.get("authorization") == "Bearer secret"
        for request in (*storage.requests, final):
            assert not any(name in request.headers for name in CREDENTIAL_FIELDS), request.headers
            assert request.headers.get("accept") == "application/json"  # other headers do follow
        assert final.headers.get("host") == f"{back_to}:{server.port}"
        raw = bytes(storage.received).lower()
        assert b"secret" not in raw and b"cookie" not in raw and b"authorization" not in raw


class _Scripted:
    """Stands in for the pool where real servers cannot: two schemes on one host and port. Records what each
    hop was sent and answers from ``answers`` (URL -> (status, Location or None))."""

    def __init__(self, answers: dict[str, tuple[int, str | None]]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, dict[str, str]]] = []

    async def send(self, method: str, url: object, headers: list[tuple[str, str]]) -> _ScriptedResponse:
        self.sent.append((str(url), {name.lower(): value for name, value in headers}))
        status, location = self.answers[str(url)]
        return _ScriptedResponse(status, location, str(url))


class _ScriptedResponse:
    def __init__(self, status: int, location: str | None, url: str) -> None:
        self.status = status
        self.url = url
        self.history: tuple[str, ...] = ()
        self.headers = Headers([("Location", location)] if location else [])
        self.content_length = 0

    async def read_all(self, limit: int) -> bytes:
        return b""

    async def aclose(self) -> None:
        pass

    async def abandon(self) -> None:
        pass


async def test_scheme_change_on_the_same_host_and_port_drops_credentials() -> None:
    pool = _Scripted(
        {
            "http://registry.example:5000/v2/blob": (307, "https://registry.example:5000/storage"),
            "https://registry.example:5000/storage": (307, "https://registry.example:5001/v2/again"),
            "https://registry.example:5001/v2/again": (200, None),
        }
    )
    response = await request_following_redirects(pool, "GET", "http://registry.example:5000/v2/blob", CREDENTIALED)  # type: ignore[arg-type]
    assert response.status == 200
    (first, *rest) = pool.sent
    assert first[1]["authorization"] == "Bearer secret"
    assert [url for url, _ in rest] == [
        "https://registry.example:5000/storage",
        "https://registry.example:5001/v2/again",
    ]
    for _, headers in rest:
        assert not any(name in headers for name in CREDENTIAL_FIELDS), headers
        assert headers["accept"] == "application/json"


async def test_https_to_http_on_the_same_host_is_refused() -> None:
    pool = _Scripted({"https://registry.example/v2/blob": (302, "http://registry.example/v2/blob")})
    with pytest.raises(RedirectError, match="from https to http"):
        await request_following_redirects(pool, "GET", "https://registry.example/v2/blob", CREDENTIALED)  # type: ignore[arg-type]
    assert len(pool.sent) == 1
