"""The pool: reuse only what is reusable, a per-host limit, stale idle connections, proxies from the environment."""

from __future__ import annotations

import pytest
import trio

from proxy.http.connection import Connection
from proxy.http.errors import ConnectError, ProxyConfigError, ProxyTunnelError
from proxy.http.pool import ConnectionPool
from proxy.http.proxies import NoProxy, ProxyConfig, ProxyURL
from proxy.http.url import Origin
from tests.http.server import FAST, Reply, TestServer, serve, serve_proxy

BODY = b"x" * 200_000


async def test_keep_alive_get_reuses_one_connection(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/v2/", Reply(body=b"{}"))
    for _ in range(3):
        async with pool.request("GET", server.url("/v2/")) as response:
            assert response.status == 200
            assert await response.read_all(100) == b"{}"
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [1, 1, 1]
    assert pool.stats.connections_opened == 1
    assert pool.stats.connections_reused == 2
    assert pool.idle_connections(server.url()) == 1


async def test_unread_or_abandoned_body_is_not_reused(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/blob", Reply(body=BODY))
    async with pool.request("GET", server.url("/blob")) as response:
        await response.abandon()  # e.g. a 200 to a Range request
    async with pool.request("GET", server.url("/blob")) as response:
        assert await response.read_some(10)  # most of the body is left unread
    async with pool.request("GET", server.url("/blob")) as response:
        assert len(await response.read_all(len(BODY))) == len(BODY)
    async with pool.request("GET", server.url("/blob")) as response:
        await response.read_all(len(BODY))
    assert server.connections == 3
    assert [r.connection for r in server.requests] == [1, 2, 3, 3]


async def test_exception_in_block_closes_the_connection(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/", Reply(body=b"ok"))
    with pytest.raises(KeyError):
        async with pool.request("GET", server.url("/")) as response:
            await response.read_all(10)
            raise KeyError("caller's bug")
    assert pool.idle_connections(server.url()) == 0


async def test_head_and_empty_bodies_are_reused(server: TestServer, pool: ConnectionPool) -> None:
    server.route("/blob", Reply(body=BODY))
    server.route("/empty", Reply(status=202))
    for method, path in (("HEAD", "/blob"), ("GET", "/empty"), ("HEAD", "/blob")):
        async with pool.request(method, server.url(path)) as response:
            assert response.status in (200, 202)
    assert server.connections == 1


async def test_per_host_limit_counts_requests_waiting_for_headers(server: TestServer) -> None:
    # a server that never answers: every request holds its slot until its header deadline
    server.route("/hang", Reply(no_response=True))
    limit = 2
    async with ConnectionPool(FAST, max_per_host=limit, proxies=ProxyConfig()) as pool, trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(pool.send, "GET", server.url("/hang"))
        await trio.testing.wait_all_tasks_blocked()
        # two requests reached the host; three wait for a slot
        assert server.connections == limit
        assert len(server.requests) == limit
        nursery.cancel_scope.cancel()


async def test_unread_bodies_do_not_hold_slots(server: TestServer) -> None:
    # eight responses whose bodies nobody reads (a client that does not read its pipes) do not keep a ninth
    # request from reaching the host: the per-host cap counts only requests waiting for the network
    body = b"x" * (512 << 10)  # under the 1 MiB a connection reads past h11 (then it is not reused)
    server.route("/blob", Reply(body=body))
    server.route("/small", Reply(body=b"ok"))
    async with ConnectionPool(FAST, max_per_host=2, proxies=ProxyConfig()) as pool:
        held: list = []
        try:
            with trio.fail_after(5):
                for _ in range(8):
                    held.append(await pool.send("GET", server.url("/blob")))
                async with pool.request("GET", server.url("/small")) as response:
                    assert await response.read_all(10) == b"ok"
            for response in held:
                assert await response.read_all(len(body)) == body
        finally:
            for response in held:
                await response.aclose()
        # given back after reading: at most max_per_host stay idle, the rest are closed
        assert pool.idle_connections(server.url()) == 2


async def test_server_closed_idle_connection_is_discarded(server: TestServer, pool: ConnectionPool) -> None:
    # keep-alive headers, then the server drops the connection while it is idle in the pool
    server.route("/", Reply(body=b"ok", close_after_response=True))
    for _ in range(3):
        async with pool.request("GET", server.url("/")) as response:
            assert await response.read_all(10) == b"ok"
        await _wait_for_server_close(pool, server)
    assert server.connections == 3
    assert pool.stats.stale_discarded == 2
    assert pool.stats.retried_on_new_connection == 0


async def test_idempotent_request_retried_once_on_a_stale_connection(
    server: TestServer, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the race the readability check cannot catch: the server closes just as the request goes out
    monkeypatch.setattr(Connection, "is_readable", lambda self: False)
    server.route("/", Reply(body=b"ok", close_after_response=True))
    for _ in range(2):
        async with pool.request("GET", server.url("/")) as response:
            assert await response.read_all(10) == b"ok"
    assert server.connections == 2
    assert pool.stats.retried_on_new_connection == 1


async def test_connect_refused_through_pool(pool: ConnectionPool) -> None:
    async with serve() as doomed:
        url = doomed.url("/")
    with pytest.raises(ConnectError) as caught:
        async with pool.request("GET", url):
            pass
    assert caught.value.retryable


async def _wait_for_server_close(pool: ConnectionPool, server: TestServer) -> None:
    """Wait (bounded, event-driven) until the server's FIN reached every idle connection."""
    host = pool._hosts[Origin("http", "127.0.0.1", server.port)]
    with trio.fail_after(5):
        for conn in host.idle:
            await trio.lowlevel.wait_readable(conn._stream.socket)  # type: ignore[attr-defined]


# -- proxies -------------------------------------------------------------------------------------------------


def test_proxy_environment_precedence() -> None:
    config = ProxyConfig.from_environ({"HTTPS_PROXY": "upper:1", "https_proxy": "lower:2", "http_proxy": "plain:3"})
    assert config.proxy_for(Origin("https", "registry.example", 443)) == ProxyURL("upper", 1)
    assert config.proxy_for(Origin("http", "registry.example", 80)) == ProxyURL("plain", 3)
    assert ProxyConfig.from_environ({}).proxy_for(Origin("https", "registry.example", 443)) is None


def test_proxy_url_forms() -> None:
    assert ProxyURL.parse("proxy.corp") == ProxyURL("proxy.corp", 80)
    with_auth = ProxyURL.parse("http://us%40er:p%3Ass@proxy.corp:3128/")
    assert with_auth.host == "proxy.corp" and with_auth.port == 3128
    assert with_auth.authorization == "Basic dXNAZXI6cDpzcw=="  # us@er:p:ss
    with pytest.raises(ProxyConfigError, match="only http://"):
        ProxyURL.parse("socks5://proxy.corp:1080")


def test_loopback_is_never_proxied_by_default() -> None:
    env = {"https_proxy": "proxy.corp:3128"}
    for host in ("localhost", "127.0.0.1", "::1"):
        assert ProxyConfig.from_environ(env).proxy_for(Origin("https", host, 443)) is None
        assert ProxyConfig.from_environ(env, proxy_loopback=True).proxy_for(Origin("https", host, 443)) is not None


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("*", "anything.example", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "registry.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        (".example.com", "example.com", 443, False),
        (".example.com", "registry.example.com", 443, True),
        ("*.example.com", "registry.example.com", 443, True),
        ("*.example.com", "example.com", 443, False),
        ("example.com:5000", "example.com", 5000, True),
        ("example.com:5000", "example.com", 443, False),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("192.168.1.1", "192.168.1.1", 443, True),
        ("192.168.1.1:80", "192.168.1.1", 443, False),
        ("[2001:db8::1]:443", "2001:db8::1", 443, True),
        (" a.example , B.Example ", "b.example", 443, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    assert NoProxy.parse(no_proxy).matches(host, port) is bypass
    config = ProxyConfig.from_environ({"HTTPS_PROXY": "proxy:1", "no_proxy": no_proxy})
    assert (config.proxy_for(Origin("https", host, port)) is None) is bypass


async def test_http_through_proxy_uses_absolute_form(server: TestServer) -> None:
    # the scripted server plays the proxy: it sees the absolute-form target and the Proxy-Authorization
    server.route("/v2/", Reply(body=b"{}"))
    proxies = ProxyConfig.from_environ({"HTTP_PROXY": f"http://u:p@127.0.0.1:{server.port}"}, proxy_loopback=True)
    pool = ConnectionPool(FAST, proxies=proxies)
    async with pool, pool.request("GET", "http://registry.test:5000/v2/") as response:
        assert await response.read_all(10) == b"{}"
    seen = server.requests[0]
    assert seen.target == "http://registry.test:5000/v2/"
    assert seen.headers["host"] == "registry.test:5000"
    assert seen.headers["proxy-authorization"] == "Basic dTpw"


async def test_connect_refused_by_proxy(server: TestServer) -> None:
    async with serve_proxy(status=407) as proxy:
        proxies = ProxyConfig.from_environ({"HTTPS_PROXY": f"127.0.0.1:{proxy.port}"}, proxy_loopback=True)
        async with ConnectionPool(FAST, proxies=proxies) as pool:
            with pytest.raises(ProxyTunnelError) as caught:
                async with pool.request("GET", f"https://127.0.0.1:{server.port}/"):
                    pass
    assert caught.value.status == 407
    assert not caught.value.retryable
    assert "proxy authentication required" in str(caught.value)
    assert proxy.targets == [f"127.0.0.1:{server.port}"]
