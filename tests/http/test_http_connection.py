"""One connection: deadlines per phase, body framing, errors that say what happened."""

from __future__ import annotations

import gzip
import socket
from functools import partial

import pytest
import trio

from proxy.http.connection import RAW_BODY_MIN, Connection, open_connection
from proxy.http.errors import (
    BodyTooLarge,
    ConnectError,
    ConnectionLost,
    HTTPTimeoutError,
    Phase,
    ProtocolError,
    StallError,
)
from proxy.http.timeouts import Timeouts
from proxy.http.url import URL, Origin
from tests.http.server import FAST, Reply, TestServer

BODY = bytes(range(256)) * 400  # 100 KiB: more than one read


async def connect(server: TestServer, timeouts: Timeouts = FAST) -> Connection:
    return await open_connection(URL.parse(server.url()).origin, timeouts)


async def test_get_body_and_headers(server: TestServer) -> None:
    server.route("/blob", Reply(headers=[("Docker-Content-Digest", "sha256:abc")], body=BODY))
    conn = await connect(server)
    response = await conn.request("GET", "/blob", {"Accept-Encoding": "identity"})
    assert (response.status, response.reason, response.http_version) == (200, "", "1.1")
    assert response.headers.get("DOCKER-content-digest") == "sha256:abc"
    assert "Content-Length" in response.headers
    assert response.content_length == len(BODY)
    chunks = []
    while chunk := await response.read_some(1000):
        assert len(chunk) <= 1000
        chunks.append(chunk)
    assert b"".join(chunks) == BODY
    assert response.received == len(BODY)
    await response.aclose()
    assert conn.reusable
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"
    assert server.requests[0].headers["accept-encoding"] == "identity"
    await conn.aclose()


async def test_keep_alive_carries_a_second_request(server: TestServer) -> None:
    server.route("/a", Reply(body=b"one"))
    server.route("/b", Reply(content_length=False, body=b"two"))  # chunked
    conn = await connect(server)
    for path, expected in (("/a", b"one"), ("/b", b"two")):
        async with await conn.request("GET", path) as response:
            assert await response.read_all(100) == expected
    assert conn.reusable
    assert server.connections == 1
    assert conn.requests_sent == 2
    await conn.aclose()


async def test_post_sends_body_with_length(server: TestServer) -> None:
    server.route("/token", Reply(body=b"{}"))
    conn = await connect(server)
    async with await conn.request("POST", "/token", [("Content-Type", "x")], b"grant_type=x") as response:
        assert await response.read_all(10) == b"{}"
    assert server.requests[0].body == b"grant_type=x"
    assert server.requests[0].headers["content-length"] == "12"
    await conn.aclose()


async def test_connection_close_is_not_reusable(server: TestServer) -> None:
    server.route("/", Reply(body=b"bye", keep_alive=False))
    conn = await connect(server)
    async with await conn.request("GET", "/") as response:
        assert await response.read_all(100) == b"bye"
    assert not conn.reusable
    await conn.aclose()


async def test_read_until_close_body(server: TestServer) -> None:
    server.route("/", Reply(body=BODY, content_length=False, keep_alive=False))
    conn = await connect(server)
    async with await conn.request("GET", "/") as response:
        assert response.content_length is None
        assert await response.read_all(len(BODY)) == BODY
    assert not conn.reusable


async def test_head_needs_no_body_read(server: TestServer) -> None:
    server.route("/blob", Reply(body=BODY))
    conn = await connect(server)
    response = await conn.request("HEAD", "/blob")
    assert response.content_length == len(BODY)
    await response.aclose()
    assert conn.reusable
    await conn.aclose()


async def test_lf_only_status_line_and_headers(server: TestServer) -> None:
    # Docker Hub's HAP429 answer once came with bare LF line ends
    server.route("/", Reply(status=429, headers=[("Retry-After", "3")], body=b"slow down", lf_only=True))
    conn = await connect(server)
    async with await conn.request("GET", "/") as response:
        assert response.status == 429
        assert response.headers.get("retry-after") == "3"
        assert await response.read_all(100) == b"slow down"
    assert conn.reusable
    await conn.aclose()


async def test_stall_deadline_names_host_port_and_bytes(server: TestServer) -> None:
    server.route("/blob", Reply(body=BODY, stall_after=1234))
    conn = await connect(server, Timeouts(connect=5, tls=5, headers=5, stall=0.5))
    response = await conn.request("GET", "/blob")
    start = trio.current_time()
    with pytest.raises(StallError) as caught:
        while await response.read_some():
            pass
    elapsed = trio.current_time() - start
    assert 0.4 < elapsed < 4
    error = caught.value
    assert (error.host, error.port, error.phase, error.received, error.expected) == (
        "127.0.0.1",
        server.port,
        Phase.BODY,
        1234,
        len(BODY),
    )
    assert error.retryable
    assert f"127.0.0.1:{server.port}" in str(error)
    assert "1234 of 102400 body bytes" in str(error)
    await response.aclose()
    assert not conn.reusable
    assert conn.closed


async def test_slow_but_moving_body_does_not_stall(server: TestServer) -> None:
    # every read has its own deadline: a body that keeps arriving is fine however long it takes in total
    server.route("/blob", Reply(body=BODY))
    conn = await connect(server, Timeouts(connect=5, tls=5, headers=5, stall=0.5))
    async with await conn.request("GET", "/blob") as response:
        total = 0
        while chunk := await response.read_some(4096):
            total += len(chunk)
        assert total == len(BODY)
    await conn.aclose()


async def test_header_deadline(server: TestServer) -> None:
    server.route("/", Reply(no_response=True))
    conn = await connect(server, Timeouts(connect=5, tls=5, headers=0.3, stall=5))
    with pytest.raises(HTTPTimeoutError) as caught:
        await conn.request("GET", "/")
    assert caught.value.phase is Phase.HEADERS
    assert caught.value.retryable
    assert "response headers" in str(caught.value)
    assert not conn.reusable
    await conn.aclose()


async def test_eof_mid_body_is_retryable(server: TestServer) -> None:
    server.route("/blob", Reply(body=BODY, close_after=5000))
    conn = await connect(server)
    response = await conn.request("GET", "/blob")
    with pytest.raises(ConnectionLost) as caught:
        await response.read_all(len(BODY))
    assert caught.value.retryable
    assert caught.value.phase is Phase.BODY
    assert caught.value.received == 5000
    assert "5000 of 102400" in str(caught.value)
    await response.aclose()


async def test_reset_mid_body_is_retryable(server: TestServer) -> None:
    server.route("/blob", Reply(body=BODY, reset_after=len(BODY) - 100))
    conn = await connect(server)
    response = await conn.request("GET", "/blob")
    with pytest.raises(ConnectionLost) as caught:
        await response.read_all(len(BODY))
    assert caught.value.retryable
    await response.aclose()


async def test_close_before_response_is_retryable(server: TestServer) -> None:
    server.route("/", Reply(drop=True))
    conn = await connect(server)
    with pytest.raises(ConnectionLost) as caught:
        await conn.request("GET", "/")
    assert caught.value.phase is Phase.HEADERS
    assert caught.value.retryable
    assert "before the response headers" in str(caught.value)
    assert conn.received_in_cycle == 0
    await conn.aclose()


async def test_close_right_after_head_is_retryable(server: TestServer) -> None:
    server.route("/", Reply(close_after=0, body=b"x"))
    conn = await connect(server)
    response = await conn.request("GET", "/")
    with pytest.raises(ConnectionLost) as caught:
        await response.read_all(10)
    assert caught.value.phase is Phase.BODY
    await response.aclose()


async def test_garbage_is_a_protocol_error_not_retryable() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        conn = await open_connection(Origin("http", "127.0.0.1", port), FAST)
        with pytest.raises(ProtocolError) as caught:
            await conn.request("GET", "/")
        assert not caught.value.retryable
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_read_all_limit(server: TestServer) -> None:
    server.route("/declared", Reply(body=BODY))
    server.route("/chunked", Reply(body=BODY, content_length=False))
    conn = await connect(server)
    for path in ("/declared", "/chunked"):
        if conn.closed:
            conn = await connect(server)
        response = await conn.request("GET", path)
        with pytest.raises(BodyTooLarge) as caught:
            await response.read_all(1000)
        assert "limit 1000 bytes" in str(caught.value)
        assert not caught.value.retryable
        await response.aclose()
        assert not conn.reusable
        await conn.aclose()


async def test_abandon_closes_without_draining(server: TestServer) -> None:
    server.route("/blob", Reply(body=BODY, stall_after=10))  # would stall if we tried to drain
    conn = await connect(server)
    response = await conn.request("GET", "/blob")
    with trio.fail_after(2):
        await response.abandon()
    assert conn.closed


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_connect_refused_is_retryable() -> None:
    port = _closed_port()
    with pytest.raises(ConnectError) as caught:
        await open_connection(Origin("http", "127.0.0.1", port), FAST)
    error = caught.value
    assert (error.host, error.port, error.phase) == ("127.0.0.1", port, Phase.CONNECT)
    assert error.retryable
    assert f"127.0.0.1:{port}" in str(error)


async def test_bodies_are_never_decoded(server: TestServer) -> None:
    compressed = gzip.compress(b"layer bytes" * 100)
    server.route("/blob", Reply(headers=[("Content-Encoding", "gzip")], body=compressed))
    conn = await connect(server)
    async with await conn.request("GET", "/blob", {"Accept-Encoding": "identity"}) as response:
        assert response.headers.get("content-encoding") == "gzip"
        assert await response.read_all(1 << 20) == compressed  # the digest is over these bytes
    await conn.aclose()


async def test_bytes_after_a_response_make_the_connection_unusable() -> None:
    """A body longer than its Content-Length (or an unsolicited second response) must never be parsed as the
    answer to the next request on the same connection."""

    async def overlong(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        second = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + second)
        await stream.receive_some(65536)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, overlong, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        conn = await open_connection(Origin("http", "127.0.0.1", port), FAST)
        async with await conn.request("GET", "/") as response:
            assert await response.read_all(100) == b"first"
        assert not conn.reusable
        await conn.aclose()
        nursery.cancel_scope.cancel()


# -- large bodies are read past h11 ------------------------------------------------------------------------------

BIG = bytes(range(256)) * (RAW_BODY_MIN // 256 + 4099)


async def test_a_large_body_is_read_whole_and_the_connection_is_not_reused(server: TestServer) -> None:
    server.route("/big", Reply(body=BIG))
    server.route("/small", Reply(body=b"small"))
    conn = await connect(server)
    async with await conn.request("GET", "/big") as response:
        parts = []
        while chunk := await response.read_some(300_000):
            assert len(chunk) <= 300_000
            parts.append(chunk)
        assert b"".join(parts) == BIG and response.complete and response.received == len(BIG)
    assert not conn.reusable, "h11 never saw that body: the connection must not carry another request"
    await conn.aclose()


async def test_a_large_body_that_stalls_raises_a_stall_error(server: TestServer) -> None:
    server.route("/big", Reply(body=BIG, stall_after=RAW_BODY_MIN + 10))
    conn = await connect(server)
    async with await conn.request("GET", "/big") as response:
        with pytest.raises(StallError) as caught:
            while await response.read_some():
                pass
    assert caught.value.retryable and f"{RAW_BODY_MIN + 10} of {len(BIG)}" in str(caught.value)
    await conn.aclose()


async def test_a_large_body_cut_short_is_connection_lost(server: TestServer) -> None:
    server.route("/big", Reply(body=BIG, close_after=RAW_BODY_MIN + 10))
    conn = await connect(server)
    async with await conn.request("GET", "/big") as response:
        with pytest.raises(ConnectionLost) as caught:
            while await response.read_some():
                pass
    assert caught.value.retryable
    await conn.aclose()


async def test_a_head_answer_with_a_large_content_length_has_no_body(server: TestServer) -> None:
    server.route("/big", Reply(body=BIG))
    conn = await connect(server)
    async with await conn.request("HEAD", "/big") as response:
        assert response.content_length == len(BIG)
        assert await response.read_some() == b""
    assert conn.reusable
    await conn.aclose()
