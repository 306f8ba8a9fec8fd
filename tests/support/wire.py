"""A small synchronous driver for the image-proxy wire protocol.

It deliberately shares nothing with ``protocol/``: it builds request packets with :mod:`json`, receives
replies with ``recvmsg`` (32 KiB data, room for two ``SCM_RIGHTS`` fds, ``MSG_TRUNC``/``MSG_CTRUNC``
checked) and drains pipe fds with ``poll`` in the same thread that waits for the FinishPipe reply, so it
never falls into the read-to-EOF-before-FinishPipe deadlock (protocol notes §4.3). It is the reference
harness for the differential tests: the same calls go to skopeo's proxy and to ours.

Every blocking step is bounded by ``timeout`` seconds; a server that stalls fails the test with
:class:`WireError` (an ``AssertionError``) instead of hanging it. The server process is always killed by
:meth:`ProxyProcess.close` (also on context-manager exit).
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

#: the protocol's maximum packet size (``maxMsgSize`` in the Go server, ``MAX_MSG_SIZE`` in the Rust client)
MAX_MSG_SIZE = 32 * 1024
#: ancillary buffer for at most two fds (GetRawBlob's data + error fds); more sets ``MSG_CTRUNC``
FD_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)
#: default bound, in seconds, on every receive, pipe drain and process exit
DEFAULT_TIMEOUT = 30.0
#: the reply keys, in the order the 0.2.8 server marshals them
REPLY_KEYS = ("success", "value", "pipeid", "error_code", "error")

SockfdMode = Literal["stdin", "fd3"]
Reply = dict[str, Any]


class WireError(AssertionError):
    """The server broke the protocol, stalled, or died."""


def encode(method: str, args: Sequence[Any] | None = ()) -> bytes:
    """One request packet: ``{"method": M, "args": [...]}`` (``None`` args encode as ``null``)."""
    return json.dumps({"method": method, "args": None if args is None else list(args)}).encode()


def reply_keys(raw: bytes) -> list[str]:
    """The top-level keys of a raw reply, in wire order (duplicates kept)."""
    keys: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys[:] = [key for key, _ in pairs]  # the outermost object is decoded last
        return dict(pairs)

    json.loads(raw, object_pairs_hook=hook)
    return keys


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every ``SCM_RIGHTS`` message (a truncated trailing int is ignored)."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass
class ProxyProcess:
    """One server process connected over a ``SOCK_SEQPACKET`` socketpair."""

    sock: socket.socket
    process: subprocess.Popen[bytes]
    argv: list[str]
    timeout: float = DEFAULT_TIMEOUT
    #: every reply packet received, raw, in order (for wire-format checks over a whole session)
    received: list[bytes] = field(default_factory=list)
    _stderr: IO[bytes] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        sockfd_mode: SockfdMode = "stdin",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> ProxyProcess:
        """Start ``argv`` with the peer socket on stdin, or on fd 3 with ``--sockfd 3`` appended."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the ProxyProcess, closed in close()
        full = list(argv)
        try:
            if sockfd_mode == "stdin":
                process = subprocess.Popen(full, stdin=theirs, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
            elif sockfd_mode == "fd3":
                full += ["--sockfd", "3"]
                peer = theirs.fileno()

                def to_fd3() -> None:  # runs in the child between fork and exec
                    if peer == 3:
                        os.set_inheritable(3, True)
                    else:
                        os.dup2(peer, 3)  # the copy is inheritable

                process = subprocess.Popen(
                    full,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    close_fds=False,  # fd 3 must survive; Python's own fds are all non-inheritable (PEP 446)
                    preexec_fn=to_fd3,
                )
            else:
                raise ValueError(f"unknown sockfd_mode {sockfd_mode!r}")
        except BaseException:
            ours.close()
            stderr.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(timeout)
        return cls(sock=ours, process=process, argv=full, timeout=timeout, _stderr=stderr)

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close our socket end and make sure the server is gone (killed if still running)."""
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=self.timeout)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _fail(self, message: str) -> WireError:
        status = self.process.poll()
        state = "running" if status is None else f"exited with {status}"
        tail = self.stderr_text()[-2000:]
        return WireError(f"{message} [{' '.join(self.argv)}: {state}; stderr: {tail!r}]")

    # ------------------------------------------------------------------ packets

    def send_raw(self, data: bytes) -> None:
        """Send one packet as is (for malformed-request tests)."""
        try:
            self.sock.send(data)
        except OSError as exc:
            raise self._fail(f"send failed: {exc}") from exc

    def receive(self) -> tuple[bytes, list[int]]:
        """One reply packet and the fds passed with it; fails on EOF, timeout or truncation."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(MAX_MSG_SIZE, FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError as exc:
            raise self._fail(f"no reply within {self.timeout} s") from exc
        except OSError as exc:
            raise self._fail(f"receive failed: {exc}") from exc
        fds = fds_from_ancdata(ancdata)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise self._fail(f"reply truncated (flags {flags:#x}): more than {MAX_MSG_SIZE} bytes or 2 fds")
        if not data and not ancdata:
            raise self._fail("the server closed the socket")
        self.received.append(data)
        return data, fds

    def call_raw(self, packet: bytes) -> tuple[bytes, Reply, list[int]]:
        """Send one raw packet, return (raw reply, decoded reply, fds)."""
        self.send_raw(packet)
        raw, fds = self.receive()
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            close_fds(fds)
            raise self._fail(f"reply is not JSON: {raw!r}") from exc
        if not isinstance(reply, dict):
            close_fds(fds)
            raise self._fail(f"reply is not a JSON object: {raw!r}")
        return raw, reply, fds

    def call(self, method: str, args: Sequence[Any] | None = ()) -> tuple[bytes, Reply, list[int]]:
        """Send ``method(args)``, return (raw reply bytes, decoded reply, fds). The caller owns the fds."""
        return self.call_raw(encode(method, args))

    # ------------------------------------------------------------------ helpers

    def initialize(self) -> str:
        _, reply, fds = self.call("Initialize", [])
        close_fds(fds)
        if not reply.get("success") or fds:
            raise self._fail(f"Initialize failed: {reply}")
        return str(reply["value"])

    def call_ok(self, method: str, args: Sequence[Any] = ()) -> Any:
        """A metadata call that must succeed without fds; returns its value."""
        _, reply, fds = self.call(method, args)
        close_fds(fds)
        if not reply.get("success") or fds:
            raise self._fail(f"{method}{list(args)} failed or passed {len(fds)} fds: {reply}")
        return reply.get("value")

    def call_piped(self, method: str, args: Sequence[Any] = ()) -> tuple[Reply, bytes, Reply | None]:
        """A one-fd call followed by FinishPipe, the fd drained concurrently with the FinishPipe round trip.

        Returns (reply, data, FinishPipe reply); data is ``b""`` and the FinishPipe reply ``None`` when the
        call itself failed (then it must not pass fds).
        """
        _, reply, fds = self.call(method, args)
        if not reply.get("success"):
            close_fds(fds)
            if fds:
                raise self._fail(f"{method} failed but passed {len(fds)} fds: {reply}")
            return reply, b"", None
        pipeid = reply.get("pipeid")
        if len(fds) != 1 or not isinstance(pipeid, int) or pipeid == 0:
            close_fds(fds)
            raise self._fail(f"{method} must pass one fd and a nonzero pipeid, got {len(fds)} fds: {reply}")
        try:
            self.send_raw(encode("FinishPipe", [pipeid]))
            (data,), finish = self._pump(fds, expect_reply=True)
        finally:
            close_fds(fds)
        assert finish is not None
        return reply, data, finish

    def finish_reply(self, packet: tuple[bytes, list[int]]) -> Reply:
        raw, fds = packet
        close_fds(fds)
        if fds:
            raise self._fail(f"FinishPipe passed {len(fds)} fds")
        return json.loads(raw)

    def get_raw_blob(self, imgid: int, digest: str) -> tuple[Reply, bytes, bytes]:
        """GetRawBlob; returns (reply, data, error-fd bytes), both fds read concurrently to EOF."""
        _, reply, fds = self.call("GetRawBlob", [imgid, digest])
        if not reply.get("success"):
            close_fds(fds)
            if fds:
                raise self._fail(f"GetRawBlob failed but passed {len(fds)} fds: {reply}")
            return reply, b"", b""
        if len(fds) != 2 or reply.get("pipeid") != 0:
            close_fds(fds)
            raise self._fail(f"GetRawBlob must pass two fds and pipeid 0, got {len(fds)} fds: {reply}")
        try:
            (data, err), _ = self._pump(fds, expect_reply=False)
        finally:
            close_fds(fds)
        return reply, data, err

    def read_to_eof(self, fds: Sequence[int]) -> list[bytes]:
        """Read every fd to EOF concurrently, bounded by the timeout (the fds stay open)."""
        return self._pump(fds, expect_reply=False)[0]

    def read_some(self, fd: int, limit: int = 65536) -> bytes:
        """One read of at most ``limit`` bytes, waiting at most the timeout for data (or EOF)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(self.timeout * 1000):
            raise self._fail(f"no data on fd {fd} within {self.timeout} s")
        return os.read(fd, limit)

    def _pump(self, fds: Sequence[int], *, expect_reply: bool) -> tuple[list[bytes], Reply | None]:
        """Read every fd to EOF and (optionally) one reply packet, all interleaved with ``poll``."""
        buffers = {fd: bytearray() for fd in fds}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        sockfd = self.sock.fileno()
        if expect_reply:
            poller.register(sockfd, select.POLLIN)
        pending = set(fds) | ({sockfd} if expect_reply else set())
        reply: Reply | None = None
        deadline = time.monotonic() + self.timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"timed out after {self.timeout} s waiting for {sorted(pending)}")
            for fd, _events in poller.poll(remaining * 1000):
                if fd == sockfd:
                    reply = self.finish_reply(self.receive())
                    poller.unregister(fd)
                    pending.discard(fd)
                    continue
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    buffers[fd] += chunk
                else:
                    poller.unregister(fd)
                    pending.discard(fd)
        return [bytes(buffers[fd]) for fd in fds], reply

    def shutdown(self) -> int:
        """Send Shutdown, expect no reply, wait (bounded) for the exit; returns the exit code."""
        self.send_raw(encode("Shutdown", []))
        try:
            code = self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise self._fail(f"still running {self.timeout} s after Shutdown") from exc
        # The server is gone: everything it sent is queued ahead of EOF.
        try:
            data, ancdata, _, _ = self.sock.recvmsg(MAX_MSG_SIZE, FD_SPACE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data, ancdata = b"", []  # peer still open elsewhere; nothing was sent
        close_fds(fds_from_ancdata(ancdata))
        if data or ancdata:
            raise self._fail(f"Shutdown must not be answered, got {data!r}")
        return code
