"""The bulk-decrypting TLS stream against a real TLS server (trio's SSLStream, server side) over loopback TCP:
bytes in order across many records, several records per read, a peer's close with and without close_notify,
a corrupted record, cancellation while blocked, and close without a network wait."""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trustme

from proxy.http.tls_stream import TLSStream, open_tls

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def tls_pair(ca: trustme.CA, handler: Handler) -> AsyncIterator[TLSStream]:
    """A TLSStream connected to a trio TLS server on 127.0.0.1 that runs ``handler`` on its side."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def serve(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, server_context, server_side=True, https_compatible=True)
        try:
            await stream.do_handshake()
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(raw)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            stream = await open_tls(raw, client_context(ca), "127.0.0.1")
        try:
            yield stream
        finally:
            await stream.aclose()
            nursery.cancel_scope.cancel()


def payload(size: int) -> bytes:
    seed = hashlib.sha256(b"tls-stream").digest()
    return (seed * (size // len(seed) + 1))[:size]


async def read_all_into(stream: TLSStream, size: int, chunk: int = 1 << 20) -> tuple[bytes, list[int]]:
    out = bytearray()
    counts = []
    buffer = memoryview(bytearray(chunk))
    while True:
        count = await stream.receive_into(buffer)
        if not count:
            return bytes(out), counts
        counts.append(count)
        out += buffer[:count]
        assert len(out) <= size


async def test_bytes_arrive_whole_and_in_order_with_several_records_per_read(ca: trustme.CA) -> None:
    data = payload(8 << 20)

    async def send(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(data)
        await stream.aclose()  # with close_notify

    async with tls_pair(ca, send) as stream:
        with trio.fail_after(20):
            got, counts = await read_all_into(stream, len(data))
    assert got == data
    # a TLS record holds at most 16 KiB: reads that returned more drained several records at once
    assert max(counts) > 16 << 10


async def test_receive_some_returns_bytes_and_respects_the_size(ca: trustme.CA) -> None:
    data = payload(300_000)

    async def send(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(data)
        await stream.aclose()

    async with tls_pair(ca, send) as stream:
        parts = []
        with trio.fail_after(10):
            while chunk := await stream.receive_some(1000):
                assert isinstance(chunk, bytes) and 1 <= len(chunk) <= 1000
                parts.append(chunk)
    assert b"".join(parts) == data


async def test_a_close_without_close_notify_is_an_end_of_stream(ca: trustme.CA) -> None:
    data = payload(100_000)

    async def send_then_cut(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(data)
        await trio.aclose_forcefully(stream.transport_stream)  # TCP FIN, no close_notify

    async with tls_pair(ca, send_then_cut) as stream:
        with trio.fail_after(10):
            got, _ = await read_all_into(stream, len(data))
    assert got == data


async def test_a_corrupted_record_is_a_broken_resource(ca: trustme.CA) -> None:
    async def send_garbage(stream: trio.SSLStream[trio.SocketStream]) -> None:
        # an application-data record header, then bytes that do not decrypt
        await stream.transport_stream.send_all(b"\x17\x03\x03\x00\x40" + b"\x00" * 0x40)
        await trio.sleep_forever()

    async with tls_pair(ca, send_garbage) as stream:
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as caught:
            await stream.receive_into(memoryview(bytearray(1024)))
    assert isinstance(caught.value.__cause__, ssl.SSLError)


async def test_a_blocked_read_is_cancellable_and_close_does_not_wait(ca: trustme.CA) -> None:
    async def silent(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await trio.sleep_forever()

    async with tls_pair(ca, silent) as stream:
        with trio.move_on_after(0.2) as scope:
            await stream.receive_into(memoryview(bytearray(1024)))
        assert scope.cancelled_caught
        with trio.fail_after(1):
            await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_into(memoryview(bytearray(16)))


async def test_requests_and_answers_both_ways(ca: trustme.CA) -> None:
    async def echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
        for _ in range(3):
            request = await stream.receive_some(65536)
            await stream.send_all(request.upper())

    async with tls_pair(ca, echo) as stream:
        for word in (b"one", b"two", b"three"):
            await stream.send_all(word)
            with trio.fail_after(10):
                assert await stream.receive_some(100) == word.upper()
        assert stream.version() in ("TLSv1.2", "TLSv1.3")


async def test_a_certificate_for_another_name_fails_the_handshake(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.example").configure_cert(server_context)

    async def serve(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, server_context, server_side=True)
        with suppress(trio.BrokenResourceError):
            await stream.do_handshake()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        raw = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as caught:
            await open_tls(raw, client_context(ca), "127.0.0.1")
        await raw.aclose()
        nursery.cancel_scope.cancel()
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
