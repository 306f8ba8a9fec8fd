"""TLS: a private CA from a certs.d directory, verification failures, insecure hosts, client certificates,
and https through a CONNECT tunnel."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme

from proxy.http.errors import HTTPError, Phase, RedirectError, TLSConfigError, TLSError
from proxy.http.pool import ConnectionPool
from proxy.http.proxies import ProxyConfig
from proxy.http.redirects import request_following_redirects
from proxy.http.tls import create_ssl_context, first_cert_dir
from tests.http.server import FAST, Reply, TestServer, redirect, serve, serve_proxy


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(
    ca: trustme.CA, *, require_client_cert: bool = False, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


@pytest.fixture
async def tls_server(ca: trustme.CA) -> AsyncIterator[TestServer]:
    async with serve(server_context(ca)) as running:
        running.route("/v2/", Reply(body=b"{}"))
        yield running


def certs_d(root: Path, authority: str, ca: trustme.CA | None) -> Path:
    directory = root / authority
    directory.mkdir(parents=True)
    if ca is not None:
        ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    return directory


def factory(root: Path) -> Callable[[str], ssl.SSLContext]:
    return lambda authority: create_ssl_context([root / "missing", root / authority])


async def test_private_ca_from_certs_dir(tls_server: TestServer, ca: trustme.CA, tmp_path: Path) -> None:
    certs_d(tmp_path, f"127.0.0.1:{tls_server.port}", ca)
    async with ConnectionPool(FAST, factory(tmp_path), proxies=ProxyConfig()) as pool:
        for _ in range(2):
            async with pool.request("GET", tls_server.url("/v2/")) as response:
                assert response.status == 200
                assert await response.read_all(10) == b"{}"
        assert pool.stats.connections_opened == 1  # keep-alive over TLS too


async def test_unknown_ca_fails_verification_not_retryable(tls_server: TestServer, tmp_path: Path) -> None:
    async with ConnectionPool(FAST, factory(tmp_path), proxies=ProxyConfig()) as pool:
        with pytest.raises(TLSError) as caught:
            async with pool.request("GET", tls_server.url("/v2/")):
                pass
    error = caught.value
    assert error.verification_failed
    assert not error.retryable
    assert (error.host, error.port, error.phase) == ("127.0.0.1", tls_server.port, Phase.TLS)
    assert "certificate verification failed" in str(error)


async def test_wrong_host_name_fails(ca: trustme.CA, tmp_path: Path) -> None:
    # the CA is trusted, but the certificate is for another name
    async with serve(server_context(ca, names=("registry.example",))) as mismatched:
        mismatched.route("/v2/", Reply())
        certs_d(tmp_path, f"127.0.0.1:{mismatched.port}", ca)
        async with ConnectionPool(FAST, factory(tmp_path), proxies=ProxyConfig()) as pool:
            with pytest.raises(TLSError) as caught:
                async with pool.request("GET", mismatched.url("/v2/")):
                    pass
    assert caught.value.verification_failed
    assert "127.0.0.1" in str(caught.value)


async def test_insecure_skips_verification(tls_server: TestServer) -> None:
    pool = ConnectionPool(FAST, lambda _: create_ssl_context(verify=False), proxies=ProxyConfig())
    async with pool, pool.request("GET", tls_server.url("/v2/")) as response:
        assert response.status == 200


async def test_client_certificate_pair(ca: trustme.CA, tmp_path: Path) -> None:
    async with serve(server_context(ca, require_client_cert=True)) as server:
        server.route("/v2/", Reply(body=b"{}"))
        directory = certs_d(tmp_path, f"127.0.0.1:{server.port}", ca)
        client = ca.issue_cert("client.example")
        client.cert_chain_pems[0].write_to_path(str(directory / "client.cert"))
        client.private_key_pem.write_to_path(str(directory / "client.key"))
        pool = ConnectionPool(FAST, factory(tmp_path), proxies=ProxyConfig())
        async with pool, pool.request("GET", server.url("/v2/")) as response:
            assert await response.read_all(10) == b"{}"
        # without the pair the server refuses us (in TLS 1.3 the refusal arrives after the client's handshake)
        (directory / "client.cert").unlink()
        (directory / "client.key").unlink()
        async with ConnectionPool(FAST, factory(tmp_path), proxies=ProxyConfig()) as pool:
            with pytest.raises(HTTPError):
                async with pool.request("GET", server.url("/v2/")) as response:
                    await response.read_all(10)


async def test_https_through_connect_tunnel(tls_server: TestServer, ca: trustme.CA, tmp_path: Path) -> None:
    certs_d(tmp_path, f"127.0.0.1:{tls_server.port}", ca)
    async with serve_proxy() as proxy:
        env = {"HTTPS_PROXY": f"http://user:pw@127.0.0.1:{proxy.port}"}
        proxies = ProxyConfig.from_environ(env, proxy_loopback=True)
        async with ConnectionPool(FAST, factory(tmp_path), proxies=proxies) as pool:
            for _ in range(2):
                async with pool.request("GET", tls_server.url("/v2/")) as response:
                    assert await response.read_all(10) == b"{}"
    assert proxy.targets == [f"127.0.0.1:{tls_server.port}"]  # one tunnel, reused
    assert proxy.authorizations == ["Basic dXNlcjpwdw=="]
    assert tls_server.requests[0].target == "/v2/"  # origin-form inside the tunnel


async def test_https_to_http_downgrade_refused(tls_server: TestServer, ca: trustme.CA, tmp_path: Path) -> None:
    certs_d(tmp_path, f"127.0.0.1:{tls_server.port}", ca)
    async with serve() as plain:
        plain.route("/blob", Reply(body=b"leaked"))
        tls_server.route("/v2/blob", redirect(plain.url("/blob"), 307))
        async with ConnectionPool(FAST, factory(tmp_path), proxies=ProxyConfig()) as pool:
            with pytest.raises(RedirectError, match="from https to http") as caught:
                await request_following_redirects(pool, "GET", tls_server.url("/v2/blob"), {"Authorization": "x"})
        assert plain.requests == []
    assert caught.value.chain == (tls_server.url("/v2/blob"), plain.url("/blob"))


# -- the pure function ---------------------------------------------------------------------------------------


def test_first_existing_dir_wins(ca: trustme.CA, tmp_path: Path) -> None:
    first = certs_d(tmp_path / "home", "registry.example", None)
    certs_d(tmp_path / "etc", "registry.example", ca)
    dirs = [tmp_path / "nowhere", first, tmp_path / "etc" / "registry.example"]
    assert first_cert_dir(dirs) == first
    assert first_cert_dir([tmp_path / "nowhere"]) is None


def test_crt_files_are_added_to_the_trust_store(ca: trustme.CA, tmp_path: Path) -> None:
    directory = certs_d(tmp_path, "registry.example", ca)
    before = create_ssl_context(system_trust=False).cert_store_stats()["x509_ca"]
    after = create_ssl_context([directory], system_trust=False).cert_store_stats()["x509_ca"]
    assert after == before + 1


def test_cert_without_key_is_an_error(ca: trustme.CA, tmp_path: Path) -> None:
    directory = certs_d(tmp_path, "registry.example", None)
    ca.issue_cert("client.example").cert_chain_pems[0].write_to_path(str(directory / "client.cert"))
    with pytest.raises(TLSConfigError, match=r"missing key client\.key"):
        create_ssl_context([directory])


def test_key_without_cert_is_an_error(ca: trustme.CA, tmp_path: Path) -> None:
    directory = certs_d(tmp_path, "registry.example", None)
    ca.issue_cert("client.example").private_key_pem.write_to_path(str(directory / "client.key"))
    with pytest.raises(TLSConfigError, match=r"missing client certificate client\.cert"):
        create_ssl_context([directory])


def test_unreadable_crt_is_an_error(tmp_path: Path) -> None:
    directory = certs_d(tmp_path, "registry.example", None)
    (directory / "broken.crt").write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"broken\.crt"):
        create_ssl_context([directory])


def test_insecure_context() -> None:
    context = create_ssl_context(verify=False)
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname
