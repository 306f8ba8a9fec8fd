"""One client connection: the receive loop, the dispatcher, and the producers' nursery.

```
session nursery
├── receiver     recvmsg → decode → queue; EOF → cancel all; Shutdown → drain briefly, cancel all
├── dispatcher   handler calls one by one, replies sent in request order
└── producers    one task per open pipe (started by the handler)
```

The receiver never waits on anything but the socket, so Shutdown and socket EOF take effect at
once even while FinishPipe waits for a stalled producer.
"""

from __future__ import annotations

import array
import collections
import contextlib
import logging
import os
import socket

import trio

from protocol.codec import MAX_MSG_SIZE, decode_request, encode_reply
from protocol.errors import ProtocolViolation
from protocol.messages import Request
from proxy.handler import Handler, Outcome
from proxy.options import ProxyOptions
from proxy.resources import SharedResources, open_resources

log = logging.getLogger(__name__)

#: requests a client may pipeline before the session is closed as misbehaving
MAX_PENDING_REQUESTS = 4096
#: how long queued requests may still be answered after Shutdown
SHUTDOWN_GRACE = 0.5
_ANCILLARY_SPACE = socket.CMSG_SPACE(16 * array.array("i").itemsize)


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


class _SessionOver(Exception):
    """The client can no longer be answered."""


class Session:
    """Serves the protocol on one connected SOCK_SEQPACKET socket until EOF or Shutdown."""

    def __init__(self, sock: trio.socket.SocketType, options: ProxyOptions, resources: SharedResources) -> None:
        self._sock = sock
        self._options = options
        self._resources = resources
        self._queue: collections.deque[Request | ProtocolViolation] = collections.deque()
        self._queue_changed = trio.Event()
        self._receiving = True

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            handler = Handler(self._options, lambda work: nursery.start_soon(work), self._resources)
            try:
                dispatcher_done = trio.Event()

                async def dispatch() -> None:
                    try:
                        await self._dispatch(handler)
                    except _SessionOver:
                        nursery.cancel_scope.cancel()
                    finally:
                        dispatcher_done.set()

                nursery.start_soon(dispatch)
                shutdown = await self._receive()
                if shutdown:
                    # Answer what was queued before Shutdown, but never wait long.
                    with trio.move_on_after(SHUTDOWN_GRACE):
                        await dispatcher_done.wait()
                nursery.cancel_scope.cancel()
            finally:
                await handler.aclose()

    def _enqueue(self, item: Request | ProtocolViolation) -> None:
        self._queue.append(item)
        self._queue_changed.set()

    async def _receive(self) -> bool:
        """Read packets until EOF (False) or Shutdown (True)."""
        try:
            while True:
                try:
                    data, ancdata, flags, _ = await self._sock.recvmsg(
                        MAX_MSG_SIZE + 1, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                    )
                except OSError as e:
                    log.warning("client socket: %s; ending session", e)
                    return False
                stray_fds = _fds_from_ancillary(ancdata)
                if stray_fds:
                    # Clients never send descriptors; do not leak what a confused one sends.
                    _close_fds(stray_fds)
                if not data:
                    log.debug("client closed the socket")
                    return False
                request = decode_request(data, truncated=bool(flags & socket.MSG_TRUNC))
                if isinstance(request, Request) and request.method == "Shutdown":
                    log.debug("Shutdown requested")
                    return True
                if len(self._queue) >= MAX_PENDING_REQUESTS:
                    log.error("client pipelined over %d requests without reading replies", MAX_PENDING_REQUESTS)
                    return False
                self._enqueue(request)
        finally:
            self._receiving = False
            self._queue_changed.set()

    async def _dispatch(self, handler: Handler) -> None:
        while True:
            while not self._queue:
                if not self._receiving:
                    return
                self._queue_changed = trio.Event()
                await self._queue_changed.wait()
            request = self._queue.popleft()
            if isinstance(request, Request):
                log.debug("request %s %s", request.method, _shorten(request.args))
            outcome = await handler.handle(request)
            try:
                await self._send(outcome)
            except OSError as e:
                log.warning("cannot send reply: %s; ending session", e)
                raise _SessionOver from None

    async def _send(self, outcome: Outcome) -> None:
        try:
            if outcome.reply is None:
                return
            data = encode_reply(outcome.reply)
            log.debug("reply %s", data[:300])
            if outcome.fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", outcome.fds))]
                await self._sock.sendmsg([data], ancillary)
            else:
                await self._sock.send(data)
        finally:
            # Our copies of the read ends: the client has its own now (or never will).
            _close_fds(outcome.fds)


def _shorten(args: object) -> str:
    text = repr(args)
    return text if len(text) <= 200 else text[:200] + "..."


async def serve_socket(sock: socket.socket, options: ProxyOptions) -> None:
    """Serve one client on an already connected stdlib socket."""
    tsock = trio.socket.from_stdlib_socket(sock)
    with tsock:
        async with open_resources(options) as resources:
            await Session(tsock, options, resources).run()
