"""The fault proxy itself, against the real registry, with a plain h11 client: each action does what it says.

Timed checks are only where the behaviour is timed (drip, delayed headers) or where silence is the point (a
stall holds the connection open: nothing arrives for a while). Everything else waits on events.

Each test runs with the proxy in plain-HTTP and in TLS mode (see conftest.py). Over TLS the client is a strict
one (``trio.SSLStream`` without ``https_compatible``), so what ends a connection is told apart: a TCP EOF without
``close_notify`` (``"eof"``, what a ``Close`` must be), a ``close_notify`` (``"close-notify"``, which the proxy
never sends), an RST (``"reset"``).
"""

from __future__ import annotations

import errno
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio

from tests.faults.conftest import FaultImages, Layer
from tests.faults.proxy import (
    Answer,
    Close,
    DelayHeaders,
    Drip,
    FaultProxy,
    Flip,
    RequestRecord,
    Reset,
    Stall,
    StripRange,
    WrongContentRange,
    fault_proxy,
)
from tests.faults.transport import tls_client_context, tls_server_context

HANG_GUARD = 20.0
#: how long a stalled connection must stay silent to count as held open
SILENCE = 0.3


@attrs.define
class Fetched:
    status: int | None = None
    headers: dict[str, str] = attrs.Factory(dict)
    body: bytearray = attrs.Factory(bytearray)
    #: None: complete; "eof": closed before the end of the body (over TLS: without close_notify); "close-notify":
    #: over TLS, a close_notify before the end of the body; "reset": ECONNRESET
    error: str | None = None
    elapsed: float = 0.0


class Client:
    """A minimal HTTP/1.1 client on one connection (keep-alive), independent of the code under test; over TLS
    when the proxy is in TLS mode (verifying its certificate, and strict about close_notify)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.progress = trio.Event()
        self.close_notify = False

    @classmethod
    async def open(cls, fault: FaultProxy) -> Client:
        tcp = await trio.open_tcp_stream("127.0.0.1", fault.port)
        if fault.tls is None:
            return cls(tcp)
        tls = trio.SSLStream(tcp, tls_client_context(), server_hostname="127.0.0.1")
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return cls(tls)

    @classmethod
    @asynccontextmanager
    async def connect(cls, fault: FaultProxy) -> AsyncIterator[Client]:
        client = await cls.open(fault)
        async with client.stream:
            yield client

    @property
    def _eof(self) -> str:
        return "close-notify" if self.close_notify else "eof"

    async def get(
        self, path: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET", into: Fetched | None = None
    ) -> Fetched:
        result = into if into is not None else Fetched()
        started = time.monotonic()
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        request = h11.Request(method=method, target=path, headers=[("Host", "127.0.0.1"), *headers])
        await self.stream.send_all((self.conn.send(request) or b"") + (self.conn.send(h11.EndOfMessage()) or b""))
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(1 << 16)
                    # a strict SSLStream ends cleanly only on a close_notify (a bare TCP EOF is an SSLEOFError)
                    self.close_notify = self.close_notify or (not data and isinstance(self.stream, trio.SSLStream))
                    self.conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    result.status = event.status_code
                    result.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    result.body += event.data
                    self._changed()
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    result.error = self._eof
                    break
        except h11.RemoteProtocolError:
            result.error = self._eof
        except trio.BrokenResourceError as e:
            if isinstance(e.__cause__, ssl.SSLEOFError):  # TLS: the TCP connection ended without close_notify
                result.error = "eof"
            elif isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ECONNRESET:
                result.error = "reset"
            else:
                result.error = f"broken: {e.__cause__!r}"
        result.elapsed = time.monotonic() - started
        self._changed()
        return result

    def _changed(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    async def wait_for_body(self, fetched: Fetched, size: int) -> None:
        while len(fetched.body) < size:
            await self.progress.wait()

    async def stays_silent(self, seconds: float) -> bool:
        """True if the running ``get`` receives nothing (no byte, no EOF) for ``seconds``."""
        with trio.move_on_after(seconds):
            await self.progress.wait()
            return False
        return True


def blob_path(layer: Layer) -> str:
    return f"/v2/test/faults/blobs/{layer.digest}"


async def fetch(fault: FaultProxy, path: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET") -> Fetched:
    async with Client.connect(fault) as client:
        return await client.get(path, headers, method)


# ----------------------------------------------------------------------------------------------- forwarding


async def test_forwards_requests_and_counts(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    with trio.fail_after(HANG_GUARD):
        async with Client.connect(fault) as client:
            ping = await client.get("/v2/")
            got = await client.get(blob_path(layer))
            head = await client.get(blob_path(layer), method="HEAD")
    assert ping.status == 200 and ping.error is None
    assert got.status == 200 and got.error is None and bytes(got.body) == layer.data
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(layer.size)
    await fault.wait_until(lambda: not fault.open_connections)
    await fault.settled()
    counters = fault.counters
    assert counters.connections_opened == counters.connections_closed == 1
    assert counters.upstream_connections == 1  # keep-alive on both sides
    assert counters.requests == 3
    assert counters.body_bytes_to_client == len(ping.body) + layer.size
    assert counters.bytes_to_client > counters.body_bytes_to_client
    assert counters.bytes_to_upstream > 0
    assert counters.protocol_errors == counters.tls_failures == 0
    if fault.transport == "tls":
        assert counters.tls_handshakes == 1 and fault.connections[0].tls_version in ("TLSv1.2", "TLSv1.3")
    else:
        assert counters.tls_handshakes == 0 and fault.connections[0].tls_version is None
    assert [(r.method, r.path, r.connection, r.outcome) for r in fault.requests] == [
        ("GET", "/v2/", 1, "complete"),
        ("GET", blob_path(layer), 1, "complete"),
        ("HEAD", blob_path(layer), 1, "complete"),
    ]
    assert fault.requests[1].header("host") == "127.0.0.1"
    assert fault.connections[0].closed_by == "client"


async def test_the_registry_answers_ranges(fault: FaultProxy, fault_images: FaultImages) -> None:
    """What the resume relies on: the real registry answers a Range request with a 206."""
    layer = fault_images.small
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer), [("Range", "bytes=1000-")])
    assert got.status == 206 and got.error is None
    assert got.headers["content-range"] == f"bytes 1000-{layer.size - 1}/{layer.size}"
    assert bytes(got.body) == layer.data[1000:]
    assert fault.requests[0].range == "bytes=1000-" and fault.requests[0].start == 1000


# ----------------------------------------------------------------------------------------------- body faults


async def test_stall_holds_the_connection_open_after_n_bytes(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.seed
    rule = fault.add_rule(Stall(at=1000), path="/blobs/")
    fetched = Fetched()
    with trio.fail_after(HANG_GUARD):
        async with Client.connect(fault) as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.get, blob_path(layer), (), "GET", fetched)
            record = await _first_request(fault)
            await record.fault_fired.wait()
            await client.wait_for_body(fetched, 1000)
            assert await client.stays_silent(SILENCE)
            assert bytes(fetched.body) == layer.data[:1000]
            assert record.outcome == "stalled" and record.body_sent == 1000 and rule.fired == [record]
            assert fault.connections[0].is_open and fault.busy_connections == [fault.connections[0]]
            nursery.cancel_scope.cancel()
        # the client closed its end: the proxy lets go of the stalled exchange
        await fault.wait_until(lambda: not fault.open_connections)
    assert fault.connections[0].closed_by == "client"
    assert record.outcome == "stalled"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_leaving_the_proxy_ends_a_stalled_connection(fault_images: FaultImages, tls: bool) -> None:
    """Over TLS too, without close_notify."""
    layer = fault_images.small
    fetched = Fetched()
    context = tls_server_context() if tls else None
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery, fault_proxy(fault_images.registry_port, tls=context) as fault:
            fault.add_rule(Stall(at=10), path="/blobs/")
            client = await Client.open(fault)
            nursery.start_soon(client.get, blob_path(layer), (), "GET", fetched)
            await (await _first_request(fault)).fault_fired.wait()
            # the block is left while the exchange is stalled: the client's read ends (the nursery waits for it)
        await client.stream.aclose()
    assert fetched.error == "eof" and bytes(fetched.body) == layer.data[:10]


async def test_reset_after_n_bytes(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.seed
    fault.add_rule(Reset(at=5000), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer))
        await fault.wait_until(lambda: not fault.open_connections)
    assert got.status == 200 and got.error == "reset"
    # a received RST may discard what the client had not read yet: never more than N, never wrong
    assert len(got.body) <= 5000 and bytes(got.body) == layer.data[: len(got.body)]
    record = fault.requests[0]
    assert record.outcome == "reset" and record.body_sent == 5000
    assert fault.connections[0].closed_by == "proxy" and "reset" in fault.connections[0].reason


async def test_close_after_n_bytes_is_a_short_body(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.seed
    fault.add_rule(Close(at=5000), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer))
    assert got.status == 200 and got.error == "eof"
    assert bytes(got.body) == layer.data[:5000]
    assert got.headers["content-length"] == str(layer.size)
    assert fault.requests[0].outcome == "closed"


@pytest.mark.parametrize("action", [Stall(at=0), Reset(at=0), Close(at=0)], ids=["stall", "reset", "close"])
async def test_a_fault_at_offset_zero_comes_right_after_the_head(
    fault: FaultProxy, fault_images: FaultImages, action: Stall | Reset | Close
) -> None:
    layer = fault_images.small
    fault.add_rule(action, path="/blobs/")
    fetched = Fetched()
    with trio.fail_after(HANG_GUARD):
        async with Client.connect(fault) as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.get, blob_path(layer), (), "GET", fetched)
            record = await _first_request(fault)
            await record.fault_fired.wait()
            if isinstance(action, Stall):
                assert await client.stays_silent(SILENCE)
                nursery.cancel_scope.cancel()
    # the client saw the head, then the fault, and no body byte
    assert fetched.status == 200 and fetched.body == b""
    assert record.status == 200 and record.body_sent == 0
    assert fetched.error == {Stall: None, Reset: "reset", Close: "eof"}[type(action)]


async def test_a_fault_at_the_last_byte(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    fault.add_rule(Close(at=layer.size - 1), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer))
    assert got.error == "eof" and bytes(got.body) == layer.data[:-1]


async def test_drip_sends_bytes_one_at_a_time(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    fault.add_rule(Drip(at=100, count=5, interval=0.05), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer))
    assert got.error is None and bytes(got.body) == layer.data
    assert got.elapsed >= 5 * 0.05 * 0.9  # timer slack
    assert fault.requests[0].fault_fired.is_set()


async def test_delay_headers(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    fault.add_rule(DelayHeaders(0.3), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer))
    assert got.error is None and bytes(got.body) == layer.data
    assert got.elapsed >= 0.3 * 0.9


async def test_flip_one_byte(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    fault.add_rule(Flip(at=777), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer))
    assert got.error is None and len(got.body) == layer.size
    expected = bytearray(layer.data)
    expected[777] ^= 0xFF
    assert got.body == expected


# ----------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (503, "1"), (429, "2")])
async def test_answer_without_contacting_the_registry(
    fault: FaultProxy, fault_images: FaultImages, status: int, retry_after: str | None
) -> None:
    layer = fault_images.small
    fault.add_rule(Answer(status, retry_after=retry_after), path="/blobs/", nth=1)
    with trio.fail_after(HANG_GUARD):
        async with Client.connect(fault) as client:
            answered = await client.get(blob_path(layer))
            assert fault.counters.upstream_connections == 0 and fault.counters.bytes_to_upstream == 0
            again = await client.get(blob_path(layer))  # same connection, forwarded
    assert answered.status == status and answered.error is None
    assert answered.headers.get("retry-after") == retry_after
    assert b"injected" in answered.body
    assert again.status == 200 and bytes(again.body) == layer.data
    await fault.settled()
    assert [r.outcome for r in fault.requests] == ["answered", "complete"]
    assert fault.requests[0].forwarded_headers is None
    assert fault.counters.connections_opened == 1 and fault.counters.upstream_connections == 1


# ----------------------------------------------------------------------------------------------- ranges


async def test_strip_range_gets_a_200_with_everything(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    fault.add_rule(StripRange(), path="/blobs/", ranged=True)
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer), [("Range", "bytes=1000-")])
    assert got.status == 200 and bytes(got.body) == layer.data
    record = fault.requests[0]
    assert record.range == "bytes=1000-"
    assert record.forwarded_headers is not None and all(k != "range" for k, _ in record.forwarded_headers)


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (WrongContentRange(start_delta=1), "bytes 1001-{last_plus_1}/{size}"),
        (WrongContentRange(start_delta=-1), "bytes 999-{last_minus_1}/{size}"),
        (WrongContentRange(total_delta=1), "bytes 1000-{last}/{size_plus_1}"),
        (WrongContentRange(value="bytes 0-9/10"), "bytes 0-9/10"),
    ],
    ids=["start+1", "start-1", "total+1", "value"],
)
async def test_wrong_content_range(
    fault: FaultProxy, fault_images: FaultImages, action: WrongContentRange, expected: str
) -> None:
    layer = fault_images.small
    fault.add_rule(action, path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        got = await fetch(fault, blob_path(layer), [("Range", "bytes=1000-")])
    last = layer.size - 1
    assert got.status == 206
    assert got.headers["content-range"] == expected.format(
        last=last, last_plus_1=last + 1, last_minus_1=last - 1, size=layer.size, size_plus_1=layer.size + 1
    )
    assert bytes(got.body) == layer.data[1000:]  # only the header lies
    assert fault.requests[0].start == 1000  # positions follow the registry's true range


async def test_positions_are_resource_offsets(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.seed
    fault.add_rule(Close(at=1500), path="/blobs/")
    with trio.fail_after(HANG_GUARD):
        resumed = await fetch(fault, blob_path(layer), [("Range", "bytes=1000-")])
        beyond = await fetch(fault, blob_path(layer), [("Range", "bytes=2000-")])
    assert resumed.status == 206 and resumed.error == "eof" and bytes(resumed.body) == layer.data[1000:1500]
    # a range starting past the fault's offset meets it at once: a resource stuck there stays stuck
    assert beyond.status == 206 and beyond.error == "eof" and beyond.body == b""


# ----------------------------------------------------------------------------------------------- rules


async def test_rules_match_method_path_nth_and_range(fault: FaultProxy, fault_images: FaultImages) -> None:
    layer = fault_images.small
    second = fault.add_rule(Answer(503), path="/blobs/", nth=2)
    ranged = fault.add_rule(Answer(500), path="/blobs/", ranged=True)
    head = fault.add_rule(Answer(429), method="HEAD", path="/blobs/")
    other = fault.add_rule(Answer(500), path="/manifests/")
    with trio.fail_after(HANG_GUARD):
        async with Client.connect(fault) as client:
            statuses = [
                (await client.get(blob_path(layer))).status,
                (await client.get(blob_path(layer), [("Range", "bytes=5-")])).status,  # 2nd blob GET: nth wins
                (await client.get(blob_path(layer), [("Range", "bytes=5-")])).status,
                (await client.get(blob_path(layer))).status,
                (await client.get(blob_path(layer), method="HEAD")).status,
            ]
    assert statuses == [200, 503, 500, 200, 429]
    assert (second.matched, ranged.matched, head.matched, other.matched) == (4, 2, 1, 0)
    assert [r.number for r in second.fired] == [2]
    assert [r.number for r in ranged.fired] == [3]
    assert [r.number for r in head.fired] == [5]
    assert fault.requests_for("/blobs/", method=None) == fault.requests
    assert len(fault.requests_for("/blobs/", method="HEAD")) == 1


async def test_a_connection_that_does_not_speak_http_is_closed(fault: FaultProxy) -> None:
    """In TLS mode, inside TLS (the proxy closes without close_notify, as for a Close)."""
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
    with trio.fail_after(HANG_GUARD):
        client = await Client.open(fault)
        async with client.stream:
            await client.stream.send_all(client_hello)
            if fault.transport == "plain":
                assert await client.stream.receive_some(1) == b""
            else:
                with pytest.raises(trio.BrokenResourceError) as caught:
                    await client.stream.receive_some(1)
                assert isinstance(caught.value.__cause__, ssl.SSLEOFError), caught.value.__cause__
        await fault.wait_until(lambda: fault.counters.protocol_errors == 1)
    assert fault.counters.upstream_connections == 0 and fault.requests == []
    assert fault.counters.tls_handshakes == (1 if fault.transport == "tls" else 0)
    assert fault.counters.tls_failures == 0


async def test_plain_http_to_the_proxy_in_tls_mode_fails_the_handshake(fault_images: FaultImages) -> None:
    with trio.fail_after(HANG_GUARD):
        async with fault_proxy(fault_images.registry_port, tls=tls_server_context()) as fault:
            stream = await trio.open_tcp_stream("127.0.0.1", fault.port)
            async with stream:
                await stream.send_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                while await stream.receive_some(1 << 10):  # perhaps an alert, then the end
                    pass
            await fault.wait_until(lambda: fault.counters.tls_failures == 1)
            connection = fault.connections[0]
            await fault.wait_until(lambda: not connection.is_open)
    assert fault.counters.tls_handshakes == 0 and fault.counters.protocol_errors == 0
    assert fault.counters.upstream_connections == 0 and fault.requests == []
    assert connection.closed_by == "proxy" and connection.reason.startswith("TLS handshake failed")
    assert connection.tls_version is None


async def _first_request(fault: FaultProxy) -> RequestRecord:
    await fault.wait_until(lambda: bool(fault.requests))
    return fault.requests[0]
