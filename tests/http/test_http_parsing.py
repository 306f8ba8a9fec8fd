"""URL parsing and header helpers: pure functions, so property tests too."""

from __future__ import annotations

import contextlib
import socket
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProxyError
from proxy.http.errors import (
    ConnectError,
    ConnectionLost,
    HTTPError,
    InvalidURL,
    Phase,
    ProtocolError,
    ProxyTunnelError,
    StallError,
    TLSError,
)
from proxy.http.headers import Headers, without
from proxy.http.proxies import NoProxy
from proxy.http.url import URL, Origin


def test_url_parse() -> None:
    url = URL.parse("HTTPS://Registry.Example:5000/v2/x/manifests/latest?ns=docker.io")
    assert (url.scheme, url.host, url.port, url.target) == (
        "https",
        "registry.example",
        5000,
        "/v2/x/manifests/latest?ns=docker.io",
    )
    assert url.authority == "registry.example:5000"
    assert url.origin == Origin("https", "registry.example", 5000)
    assert URL.parse("https://registry.example").target == "/"
    assert URL.parse("https://registry.example").authority == "registry.example"
    assert URL.parse("https://registry.example:443/").origin.authority == "registry.example"
    assert URL.parse("http://[::1]:5000/v2/").origin.authority == "[::1]:5000"


@pytest.mark.parametrize(
    "bad", ["ftp://x/", "https:///path", "https://host:99999/", "https://user:pw@host/", "https://host/a b", "/v2/"]
)
def test_url_parse_rejects(bad: str) -> None:
    with pytest.raises(InvalidURL):
        URL.parse(bad)


def test_url_join() -> None:
    base = URL.parse("https://registry.example/v2/x/blobs/sha256:1")
    assert str(base.join("/storage/1")) == "https://registry.example/storage/1"
    assert str(base.join("./sha256:2")) == "https://registry.example/v2/x/blobs/sha256:2"
    assert (
        str(base.join("https://cdn.example/b?X-Amz-Signature=abc#frag")) == "https://cdn.example/b?X-Amz-Signature=abc"
    )
    assert str(base.join("//cdn.example/b")) == "https://cdn.example/b"


@given(st.text())
def test_url_parse_only_raises_invalid_url(text: str) -> None:
    with contextlib.suppress(InvalidURL):
        URL.parse(text)


@given(st.text(), st.text(min_size=1), st.integers(min_value=1, max_value=65535))
def test_no_proxy_never_raises(value: str, host: str, port: int) -> None:
    NoProxy.parse(value).matches(host.lower(), port)


def test_headers_lookup() -> None:
    headers = Headers([("WWW-Authenticate", "Bearer a"), ("www-authenticate", "Basic b"), ("X", "1")])
    assert headers.get("Www-Authenticate") == "Bearer a"
    assert headers.get_all("WWW-AUTHENTICATE") == ["Bearer a", "Basic b"]
    assert "x" in headers and "y" not in headers
    assert headers.get("y", "default") == "default"
    assert without([("Authorization", "t"), ("Accept", "a")], "authorization") == [("Accept", "a")]


# -- error classification ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ConnectError("h", 1, ConnectionRefusedError(111, "Connection refused")), True),
        (ConnectError("h", 1, socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")), True),
        (ConnectError("h", 1, socket.gaierror(socket.EAI_NONAME, "Name or service not known")), False),
        (TLSError("h", 1, ssl.SSLCertVerificationError(1, "certificate verify failed")), False),
        (TLSError("h", 1, ssl.SSLError(1, "wrong version number")), False),
        (TLSError("h", 1, ssl.SSLEOFError(8, "EOF occurred in violation of protocol")), True),
        (TLSError("h", 1, ConnectionResetError(104, "reset")), True),
        (StallError("h", 1, 30, 10, None), True),
        (ConnectionLost("h", 1, Phase.BODY, received=5, expected=10), True),
        (ProtocolError("h", 1, Phase.HEADERS, ValueError("bad")), False),
        (ProxyTunnelError("h", 1, "proxy:3128", 503, "Service Unavailable"), True),
        (ProxyTunnelError("h", 1, "proxy:3128", 403, "Forbidden"), False),
    ],
)
def test_retryable_classification(error: HTTPError, retryable: bool) -> None:
    assert error.retryable is retryable
    assert not isinstance(error, ProxyError)  # the HTTP client's own errors: it knows nothing of the protocol
    assert error.authority == "h:1"
