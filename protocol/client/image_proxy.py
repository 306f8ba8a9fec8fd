"""Client bindings (trio): talk to ``image-proxy`` or ``skopeo experimental-image-proxy``.

::

    async with ImageProxy.spawn() as proxy:            # ours; or argv=["skopeo", "experimental-image-proxy"]
        img = await proxy.open_image("oci:examples/hello:latest")
        digest, manifest = await proxy.get_manifest(img)
        data = await proxy.get_blob(img, layer_digest, layer_size)

After Initialize the bindings ask ``GetCapabilities``. When the server offers ``request-ids``
(docs/PROTOCOL.md) every call carries an id and its reply is matched by that id, so replies may come
back in any order and a FinishPipe that waits for a slow blob delays no other call. Otherwise (skopeo's
proxy answers the probe with an error) replies come back in request order and are matched FIFO.
Either way one sender task puts requests on the socket and one receiver task hands each reply to its
waiter: several tasks may call at once without any lock. Every pipe is drained concurrently with its
FinishPipe, never the deadlock of reading to EOF first.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from protocol.client.tasks import failing_fast, run_concurrently
from protocol.client_connection import Broken, ClientConnection
from protocol.codec import MAX_MSG_SIZE, decode_error_document, encode_request
from protocol.errors import ErrorCode, ProtocolViolation, ProxyError
from protocol.fds import ancillary_space, close_fds, fds_from_ancillary
from protocol.messages import Reply, Request

#: the oldest server version these bindings talk to (as the Rust client: ^0.2.3)
MIN_VERSION = (0, 2, 3)
DEFAULT_ARGV = (sys.executable, "-m", "proxy", "experimental-image-proxy")
#: how long ``aclose`` waits for the server to exit after Shutdown before killing it
EXIT_TIMEOUT = 5.0
_FD_SIZE = array.array("i").itemsize
_READ_SIZE = 1 << 20
#: the GetCapabilities name of the request-ids extension (docs/PROTOCOL.md)
REQUEST_IDS = "request-ids"
#: the GetCapabilities name of GetRawManifest (docs/PROTOCOL.md)
RAW_MANIFEST = "raw-manifest"

Sink = Callable[[bytes], Awaitable[None] | None]
#: told each count of bytes ``copy_blob_into`` wrote
Counter = Callable[[int], Awaitable[None] | None]


@attrs.frozen
class RawManifest:
    """GetRawManifest's answer: the manifest bytes as stored, their digest and MIME type."""

    digest: str
    media_type: str
    data: bytes


class ProxyClosed(ProxyError):
    """The server went away (exited or closed the socket) before answering."""


def parse_version(text: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(p) for p in text.split(".", 2))
    except (ValueError, AttributeError):
        raise ProtocolViolation(f"server reported an unparsable protocol version {text!r}") from None
    return major, minor, patch


@attrs.define(eq=False)
class _Waiter:
    method: str
    #: the request id (request-ids extension), or None for a call matched in order
    id: int | None = None
    event: trio.Event = attrs.field(factory=trio.Event)
    reply: Reply | None = None
    fds: list[int] = attrs.field(factory=list)
    error: ProxyError | None = None
    abandoned: bool = False


class ImageProxy:
    """A connection to one proxy server; use ``spawn`` or ``connect`` as async context managers."""

    def __init__(self, sock: trio.socket.SocketType, nursery: trio.Nursery, request_ids: bool = True) -> None:
        self._sock = sock
        self._nursery = nursery
        #: which reply answers which call (pure: protocol.client_connection)
        self._conn: ClientConnection[_Waiter] = ClientConnection()
        self._want_ids = request_ids
        self._use_ids = False
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[tuple[bytes, _Waiter]](0)
        self._closed: ProxyError | None = None
        self.version: tuple[int, int, int] = (0, 0, 0)
        self.version_text = ""
        self._capabilities: frozenset[str] | None = None

    # --------------------------------------------------------------- lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def spawn(
        cls, argv: Sequence[str] | None = None, extra_args: Sequence[str] = (), *, request_ids: bool = True
    ) -> AsyncIterator[ImageProxy]:
        """Start a server process with one end of a socketpair as its stdin.

        ``request_ids=False`` never asks for the request-ids extension: every call is matched in order, as
        with skopeo's proxy (the benchmark compares both)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [*(argv or DEFAULT_ARGV), *extra_args]
        try:
            process = await trio.lowlevel.open_process(command, stdin=theirs.fileno(), stdout=subprocess.DEVNULL)
        except OSError as e:
            ours.close()
            raise ProxyError(f"cannot start {command[0]}: {e.strerror or e}") from None
        finally:
            theirs.close()
        try:
            async with cls._serve(ours, request_ids) as proxy:
                yield proxy
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(EXIT_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, target: socket.socket | str | os.PathLike[str], *, request_ids: bool = True
    ) -> AsyncIterator[ImageProxy]:
        """Talk to a server: a daemon's listening socket path (``image-proxy daemon --listen PATH``), or an
        already connected SOCK_SEQPACKET socket. The socket is closed on exit."""
        if isinstance(target, socket.socket):
            sock = target
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                await trio.socket.from_stdlib_socket(sock).connect(os.fspath(target))
            except OSError as e:
                sock.close()
                where = os.fspath(target)
                raise ProxyError(f"cannot connect to the image proxy at {where}: {e.strerror or e}") from None
        async with cls._serve(sock, request_ids) as proxy:
            yield proxy

    @classmethod
    @contextlib.asynccontextmanager
    async def _serve(cls, sock: socket.socket, request_ids: bool) -> AsyncIterator[ImageProxy]:
        tsock = trio.socket.from_stdlib_socket(sock)
        with tsock:
            async with failing_fast() as nursery:  # callers see the error itself, not an ExceptionGroup
                proxy = cls(tsock, nursery, request_ids)
                nursery.start_soon(proxy._sender)
                nursery.start_soon(proxy._receiver)
                try:
                    await proxy._initialize()
                    yield proxy
                    await proxy.shutdown()
                finally:
                    nursery.cancel_scope.cancel()

    async def _initialize(self) -> None:
        value = await self._call_value("Initialize", [])
        if not isinstance(value, str):
            raise ProtocolViolation(f"Initialize returned {value!r}, not a version string")
        version = parse_version(value)
        if not (version >= MIN_VERSION and version[:2] == MIN_VERSION[:2]):
            raise ProxyError(f"proxy protocol version {value} is not supported (need >=0.2.3, <0.3.0)")
        self.version, self.version_text = version, value
        if self._want_ids:
            self._use_ids = REQUEST_IDS in await self.get_capabilities()

    @property
    def uses_request_ids(self) -> bool:
        """True when calls carry ids (the server offers request-ids): replies may come in any order, and a
        waiting FinishPipe delays no other call. False: replies in request order (skopeo's proxy)."""
        return self._use_ids

    async def shutdown(self) -> None:
        """Ask the server to exit (it sends no reply)."""
        if self._closed is None:
            with contextlib.suppress(OSError):
                await self._sock.send(encode_request(Request("Shutdown", [])))
            self._closed = ProxyClosed("the proxy was shut down")

    # --------------------------------------------------------------- plumbing

    async def _sender(self) -> None:
        try:
            async for data, waiter in self._outbox_recv:
                if self._closed is not None:
                    self._fail(waiter, self._closed)
                    continue
                self._conn.expect(waiter, waiter.method, waiter.id)
                try:
                    await self._sock.send(data)
                except OSError as e:
                    self._broken(ProxyClosed(f"cannot send {waiter.method} to the proxy: {e.strerror or e}"))
        finally:
            # stopped (cancelled with the code using the bindings): later calls fail at once instead of waiting
            # for a sender (a shielded clean-up call such as CloseImage would otherwise wait for its deadline)
            self._outbox_recv.close()
            self._ended()

    async def _receiver(self) -> None:
        try:
            await self._receive_replies()
        finally:
            self._ended()

    def _ended(self) -> None:
        """The sender or the receiver stopped: calls still waiting for a reply fail with ProxyClosed (the first
        reason the connection ended, if one was given) instead of waiting for a reply that cannot come."""
        self._broken(ProxyClosed("the connection to the proxy is closed"))

    async def _receive_replies(self) -> None:
        space = ancillary_space(4)
        while True:
            try:
                data, ancdata, flags, _ = await self._sock.recvmsg(MAX_MSG_SIZE, space, socket.MSG_CMSG_CLOEXEC)
            except OSError as e:
                self._broken(ProxyClosed(f"connection to the proxy failed: {e.strerror or e}"))
                return
            fds = fds_from_ancillary(ancdata)
            if not data:
                close_fds(fds)
                self._broken(ProxyClosed("the proxy closed the connection (did it exit?)"))
                return
            answered = self._conn.receive(data, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)))
            if isinstance(answered, Broken):
                close_fds(fds)
                self._fail_all(answered)
                return
            waiter = answered.handle
            waiter.reply, waiter.error = answered.reply, answered.error
            if waiter.error is not None or waiter.abandoned:
                close_fds(fds)
            else:
                waiter.fds = fds
            waiter.event.set()

    def _fail(self, waiter: _Waiter, error: ProxyError) -> None:
        waiter.error = error
        waiter.event.set()

    def _broken(self, error: ProxyError) -> None:
        self._fail_all(self._conn.close(error))

    def _fail_all(self, broken: Broken[_Waiter]) -> None:
        if self._closed is None:
            self._closed = broken.error
        for waiter in broken.waiting:
            self._fail(waiter, self._closed)

    async def call(self, method: str, args: list[Any], *, ordered: bool = False) -> tuple[Reply, list[int]]:
        """Send one request and wait for its reply; the caller owns the returned fds.

        ``ordered=True`` sends it without an id even when ids are in use: the server then answers it in order
        with the other calls without an id (protocol 0.2.8 semantics), interleaved with calls that carry one."""
        if self._closed is not None:
            raise self._closed
        request_id = None
        if self._use_ids and not ordered:
            request_id = self._conn.next_id()
        waiter = _Waiter(method, request_id)
        try:
            try:
                await self._outbox_send.send((self._conn.packet(method, args, request_id), waiter))
            except trio.BrokenResourceError:  # the sender has stopped: the connection is closed
                raise self._closed or ProxyClosed("the connection to the proxy is closed") from None
            await waiter.event.wait()
        except BaseException:
            waiter.abandoned = True
            close_fds(waiter.fds)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return waiter.reply, waiter.fds

    async def _call_fds(self, method: str, args: list[Any], nfds: int) -> tuple[Any, int, list[int]]:
        reply, fds = await self.call(method, args)
        if not reply.success:
            close_fds(fds)
            raise ProxyError(f"{method}: {reply.error}", reply.error_code)
        if len(fds) != nfds:
            close_fds(fds)
            raise ProtocolViolation(f"{method}: expected {nfds} fds in the reply, got {len(fds)}")
        if nfds == 1 and reply.pipeid == 0:
            close_fds(fds)
            raise ProtocolViolation(f"{method}: expected a pipeid with the fd")
        return reply.value, reply.pipeid, fds

    async def _call_value(self, method: str, args: list[Any]) -> Any:
        value, _, _ = await self._call_fds(method, args, 0)
        return value

    def _require(self, version: tuple[int, int, int], method: str) -> None:
        if self.version < version:
            needed = ".".join(map(str, version))
            raise ProxyError(f"{method} needs protocol {needed}; the proxy speaks {self.version_text}")

    # --------------------------------------------------------------- pipes

    async def _drain(self, fd: int, sink: Sink) -> int:
        total = 0
        stream = trio.lowlevel.FdStream(fd)
        async with stream:
            while chunk := await stream.receive_some(_READ_SIZE):
                total += len(chunk)
                result = sink(chunk)
                if result is not None:
                    await result
        return total

    async def _piped(self, method: str, args: list[Any], sink: Sink) -> Any:
        """A one-fd reply: drain the pipe while FinishPipe runs; FinishPipe's error is the result."""
        value, pipeid, (fd,) = await self._call_fds(method, args, 1)
        await run_concurrently(lambda: self._drain(fd, sink), lambda: self.finish_pipe(pipeid))
        return value

    async def _piped_bytes(self, method: str, args: list[Any]) -> tuple[Any, bytes]:
        parts: list[bytes] = []
        value = await self._piped(method, args, parts.append)
        return value, b"".join(parts)

    async def finish_pipe(self, pipeid: int) -> None:
        await self._call_value("FinishPipe", [pipeid])

    # --------------------------------------------------------------- methods

    async def get_capabilities(self) -> frozenset[str]:
        """The protocol extensions the server offers (docs/PROTOCOL.md); empty for servers without the
        GetCapabilities extension, such as skopeo's proxy. Asked once per connection."""
        if self._capabilities is None:
            reply, fds = await self.call("GetCapabilities", [])
            close_fds(fds)
            value = reply.value if reply.success else []
            names = value if isinstance(value, list) else []
            self._capabilities = frozenset(n for n in names if isinstance(n, str))
        return self._capabilities

    async def open_image(self, reference: str) -> int:
        return await self._call_value("OpenImage", [reference])

    async def open_image_optional(self, reference: str) -> int | None:
        """The image id, or None when the image does not exist."""
        self._require((0, 2, 4), "OpenImageOptional")
        image_id = await self._call_value("OpenImageOptional", [reference])
        return image_id or None

    async def close_image(self, image_id: int) -> None:
        await self._call_value("CloseImage", [image_id])

    async def get_manifest(self, image_id: int) -> tuple[str, bytes]:
        """The per-platform manifest's digest and the OCI manifest bytes."""
        return await self._piped_bytes("GetManifest", [image_id])

    async def get_config(self, image_id: int) -> bytes:
        """The OCI runtime config (deprecated upstream; prefer get_full_config)."""
        self._require((0, 2, 2), "GetConfig")
        return (await self._piped_bytes("GetConfig", [image_id]))[1]

    async def get_full_config(self, image_id: int) -> bytes:
        return (await self._piped_bytes("GetFullConfig", [image_id]))[1]

    async def get_layer_info(self, image_id: int) -> list[dict[str, Any]] | None:
        """Layer digests, sizes and media types; None on servers older than 0.2.5."""
        if self.version >= (0, 2, 7):
            _, data = await self._piped_bytes("GetLayerInfoPiped", [image_id])
            return json.loads(data)
        if self.version >= (0, 2, 5):
            return await self._call_value("GetLayerInfo", [image_id])
        return None

    async def copy_blob(self, image_id: int, digest: str, size: int, sink: Sink) -> int:
        """Stream a blob into ``sink``; the server verifies size and digest (FinishPipe's error).

        Returns the size the source reported (-1 if unknown).
        """
        return await self._piped("GetBlob", [image_id, digest, size], sink)

    async def copy_blob_into(self, image_id: int, digest: str, size: int, fd: int, moved: Counter) -> int:
        """Stream a blob into the file ``fd`` with splice(2): the bytes go from the pipe into the file inside the
        kernel and never through Python. ``moved`` is told each count of bytes written (the caller checks the
        total); the server verifies size and digest before FinishPipe succeeds. Where the file system cannot
        splice the bytes are read and written instead.

        Returns the size the source reported (-1 if unknown)."""
        value, pipeid, (pipe,) = await self._call_fds("GetBlob", [image_id, digest, size], 1)
        await run_concurrently(lambda: self._splice_into(pipe, fd, moved), lambda: self.finish_pipe(pipeid))
        return value

    async def _splice_into(self, pipe: int, fd: int, moved: Counter) -> None:
        owned = True  # until the read-and-write fallback hands the pipe to an FdStream
        try:
            os.set_blocking(pipe, False)
            while True:
                try:
                    n = os.splice(pipe, fd, _READ_SIZE, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(pipe)
                    continue
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    owned = False  # this file system cannot splice: read and write below, from where we are
                    break
                if not n:
                    return
                result = moved(n)
                if result is not None:
                    await result
                await trio.lowlevel.checkpoint()  # data may keep coming: let the other tasks run between moves
        finally:
            if owned:
                os.close(pipe)

        def write(chunk: bytes) -> Awaitable[None] | None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            return moved(len(chunk))

        await self._drain(pipe, write)

    async def get_blob(self, image_id: int, digest: str, size: int) -> bytes:
        parts: list[bytes] = []
        await self.copy_blob(image_id, digest, size, parts.append)
        return b"".join(parts)

    async def copy_raw_blob(self, image_id: int, digest: str, sink: Sink) -> int | None:
        """GetRawBlob: data and error fds read concurrently; no FinishPipe. Returns the size or None.

        An error document on the error fd raises ProxyError with its code (EPIPE means our own
        early close and is not raised, as in the Rust client).
        """
        self._require((0, 2, 8), "GetRawBlob")
        value, _, (data_fd, err_fd) = await self._call_fds("GetRawBlob", [image_id, digest], 2)
        errors: list[bytes] = []
        await run_concurrently(lambda: self._drain(data_fd, sink), lambda: self._drain(err_fd, errors.append))
        if errors:
            _raise_error_document(b"".join(errors))
        return value if isinstance(value, int) and value >= 0 else None

    async def get_raw_blob(self, image_id: int, digest: str) -> tuple[int | None, bytes]:
        parts: list[bytes] = []
        size = await self.copy_raw_blob(image_id, digest, parts.append)
        return size, b"".join(parts)

    # --------------------------------------------------------------- partial access (docs/PROTOCOL.md)

    async def get_blob_at(self, image_id: int, digest: str, ranges: Sequence[tuple[int, int]]) -> bytes:
        """Extension ``blob-ranges``: the ``(offset, length)`` ranges of a blob, concatenated in order."""
        _, data = await self._piped_bytes("GetBlobAt", [image_id, digest, [[o, n] for o, n in ranges]])
        return data

    async def get_layer_toc(self, image_id: int, digest: str) -> tuple[str, bytes]:
        """Extension ``layer-toc``: the layer's format (``zstd:chunked`` or ``estargz``) and its verified
        TOC JSON."""
        return await self._piped_bytes("GetLayerTOC", [image_id, digest])

    async def get_layer_tar_split(self, image_id: int, digest: str) -> bytes:
        """Extension ``layer-toc``: a zstd:chunked layer's verified tar-split, decompressed."""
        _, data = await self._piped_bytes("GetLayerTarSplit", [image_id, digest])
        return data

    # --------------------------------------------------------------- the stored manifest (docs/PROTOCOL.md)

    async def get_raw_manifest(self, reference: str) -> RawManifest:
        """Extension ``raw-manifest``: the manifest ``reference`` names, exactly as stored (for a multi-platform
        image its index or manifest list; no platform is chosen), with its digest and MIME type. No OpenImage
        needed. Raises ProxyError when the server does not offer the extension (skopeo's proxy)."""
        if RAW_MANIFEST not in await self.get_capabilities():
            raise ProxyError(f"GetRawManifest: the proxy does not offer the {RAW_MANIFEST} extension")
        value, data = await self._piped_bytes("GetRawManifest", [reference])
        if not (isinstance(value, dict) and isinstance(value.get("digest"), str)):
            raise ProtocolViolation(f"GetRawManifest returned {value!r}, not a digest and a media type")
        return RawManifest(value["digest"], str(value.get("media_type") or ""), data)


def _raise_error_document(data: bytes) -> None:
    error = decode_error_document(data)
    if error.code is ErrorCode.EPIPE:
        return
    raise ProxyError(f"GetRawBlob: {error.message}", error.code)


__all__ = ["DEFAULT_ARGV", "RAW_MANIFEST", "REQUEST_IDS", "ImageProxy", "ProxyClosed", "RawManifest", "parse_version"]
