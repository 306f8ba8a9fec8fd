"""Daemon mode: one long-running process serving many clients on a listening SOCK_SEQPACKET socket.

```
daemon
├── background nursery     cache downloads (shared by every client that reads them), closing old registry clients
└── connections nursery
    ├── signals            SIGTERM/SIGINT: stop accepting, grace, cancel; SIGHUP: reload configuration
    ├── acceptor           accept → peer credentials → allow-list → a session task
    └── one Session per client (its own images and pipes; the registry client, token cache and blob store
        are the process's)
```

A configuration reload makes a new *generation* (options, access policy, limits, registry client): new
connections get it, connections already open keep theirs until they end; an old generation's registry client
is closed when its last connection ends. The blob store and its downloads belong to the process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from protocol.codec import encode_reply
from protocol.messages import Reply
from proxy.registry.client import RegistryClient
from proxy.server import systemd
from proxy.server.limits import DAEMON_WIDE_LIMITS, DaemonLimits, Ledger
from proxy.server.options import ProxyOptions
from proxy.server.peer import AccessPolicy, PeerCredentials, peer_credentials, systemd_unit
from proxy.server.resources import SharedResources, open_store
from proxy.server.session import Session

if TYPE_CHECKING:
    from proxy.cache.store import BlobStore
    from proxy.server.metrics_http import MetricsExporter

log = logging.getLogger("image-proxy.server.daemon")

#: pause after a failed accept (out of fds, ...), so a persistent failure does not spin
_ACCEPT_BACKOFF = 0.1
#: a refused connection may still get one error reply, if it sends its first request within this time
_REFUSAL_WAIT = 2.0
#: refused connections being answered at once; more are closed without a reply
_MAX_REFUSALS = 32


class DaemonError(Exception):
    """The daemon cannot start (its socket cannot be made or is not usable)."""


@attrs.frozen
class DaemonSettings:
    """How the daemon listens and whom it serves."""

    listen: str
    socket_group: int | None = None
    socket_mode: int = 0o660
    access: AccessPolicy = attrs.field(factory=AccessPolicy)
    shutdown_grace: float = 10.0
    limits: DaemonLimits = DAEMON_WIDE_LIMITS
    #: ``--metrics-listen`` (host, port) and ``--metrics-textfile`` (None: off); changed only by a restart
    metrics_listen: tuple[str, int] | None = None
    metrics_textfile: str | None = None
    metrics_interval: float = 15.0


#: reads the configuration files again: (options, settings), or raises ConfigError
Loader = Callable[[], tuple[ProxyOptions, DaemonSettings]]


@attrs.define(eq=False)
class _Generation:
    options: ProxyOptions
    settings: DaemonSettings
    resources: SharedResources
    connections: int = 0


# ---------------------------------------------------------------------------------------------- the socket


def bind_listener(settings: DaemonSettings) -> socket.socket:
    """Create the listening socket at ``settings.listen``: mode and group applied before anyone can connect,
    a stale socket file from a dead daemon replaced, a live one or a non-socket left alone (DaemonError)."""
    path = Path(settings.listen)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DaemonError(f"cannot create the directory of {path}: {e.strerror}") from None
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # born 0600: nobody else can connect before the mode and group are set
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise DaemonError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        if settings.socket_group is not None:
            os.chown(path, -1, settings.socket_group)
        os.chmod(path, settings.socket_mode)
        sock.listen(128)
    except OSError as e:
        sock.close()
        path.unlink(missing_ok=True)
        raise DaemonError(f"cannot set up {path}: {e.strerror}") from None
    return sock


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EPROTOTYPE):
            raise DaemonError(f"{path}: cannot tell whether another daemon listens there: {e.strerror}") from None
        log.info("removing the stale socket %s", path)
        path.unlink(missing_ok=True)
    else:
        raise DaemonError(f"another process is already listening on {path}")
    finally:
        probe.close()


def activated_socket() -> socket.socket | None:
    """The socket systemd passed (``LISTEN_FDS``), or None when not socket-activated.

    With several fds, the first SOCK_SEQPACKET unix socket is used (``LISTEN_FDNAMES`` are logged)."""
    fds = systemd.listen_fds(os.environ, os.getpid())
    systemd.clear_activation_environment()
    chosen = None
    for fd, name in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise DaemonError(f"socket activation: fd {fd} ({name}): {e.strerror}") from None
        if chosen is None and sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
            log.info("using the socket passed by the service manager (fd %d, %s)", fd, name)
            chosen = sock
        else:
            log.warning("socket activation: ignoring fd %d (%s): not a unix SOCK_SEQPACKET socket", fd, name)
            sock.close()
    if fds and chosen is None:
        raise DaemonError("socket activation passed no unix SOCK_SEQPACKET socket (ListenSequentialPacket=)")
    if chosen is not None:
        os.set_inheritable(chosen.fileno(), False)
    return chosen


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


# ---------------------------------------------------------------------------------------------- the daemon


class Daemon:
    def __init__(self, listener: socket.socket, options: ProxyOptions, settings: DaemonSettings, reload: Loader):
        self._listener = trio.socket.from_stdlib_socket(listener)
        self._options = options
        self._settings = settings
        self._reload_config = reload
        self._store = open_store(options)
        self._generation: _Generation | None = None
        self._sessions: set[Session] = set()
        self._accepting = trio.CancelScope()
        self._stopping = False
        self._background: trio.Nursery | None = None
        self._grace_over = trio.Event()
        #: set when a session may have become idle, or ended (the shutdown grace period waits on it)
        self._activity = trio.Event()
        self._registries: list[RegistryClient] = []  # of every generation not yet retired
        self._ledger = Ledger(settings.limits)
        self._refusals = 0
        #: the Prometheus exporter (proxy.server.metrics_http), when metrics are on
        self.metrics: MetricsExporter | None = None

    @property
    def store(self) -> BlobStore | None:
        return self._store

    # ----------------------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Accept clients until SIGTERM/SIGINT; then give transfers in flight the grace period, cancel what is
        left and return."""
        # the handlers are in place before READY=1: a SIGTERM right after it stops the daemon, not kills it
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as background:
                self._background = background
                self._generation = self._new_generation(self._options, self._settings)
                if self.metrics is not None:
                    background.start_soon(self.metrics.run)
                try:
                    async with trio.open_nursery() as connections:
                        connections.start_soon(self._watch_signals, signals)
                        with self._accepting:
                            await self._accept_loop(connections)
                        await self._drain()
                        connections.cancel_scope.cancel()
                finally:
                    background.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        for registry in self._registries:
                            await registry.aclose()
        log.info("stopped")

    def stop(self) -> None:
        """Stop accepting; connections get the grace period (a second stop cancels them at once)."""
        if self._stopping:
            log.warning("stopping now: cancelling %d connection(s)", len(self._sessions))
            self._settings = attrs.evolve(self._settings, shutdown_grace=0)
            self._grace_over.set()
            self._activity.set()
            return
        self._stopping = True
        systemd.notify("STOPPING=1")
        log.info(
            "stopping: no new connections; %d connection(s) get up to %gs to finish their transfers",
            len(self._sessions),
            self._settings.shutdown_grace,
        )
        self._accepting.cancel()

    async def _drain(self) -> None:
        self._listener.close()
        with trio.move_on_after(self._settings.shutdown_grace):
            while any(session.busy for session in self._sessions) and not self._grace_over.is_set():
                self._activity = trio.Event()
                await self._activity.wait()
        busy = sum(session.busy for session in self._sessions)
        if busy:
            log.warning("grace period over: cancelling %d connection(s) with transfers in flight", busy)

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.reload()
            else:
                log.info("%s received", signal.Signals(signum).name)
                self.stop()

    # ----------------------------------------------------------------------------- configuration

    def _new_generation(self, options: ProxyOptions, settings: DaemonSettings) -> _Generation:
        assert self._background is not None
        resources = SharedResources.build(options, self._background, self._store)
        self._registries.append(resources.registry)
        return _Generation(options, settings, resources)

    def reload(self) -> None:
        """SIGHUP: read the configuration again; new connections get it. A file with errors changes nothing."""
        systemd.notify("RELOADING=1")
        try:
            try:
                options, settings = self._reload_config()
            except Exception as e:  # ConfigError, or anything a broken file provokes: keep serving
                log.error("configuration not reloaded, keeping the previous one: %s", e)
                return
            old = self._generation
            assert old is not None
            if settings.listen != old.settings.listen:
                log.warning("the listening socket changes only with a restart (still %s)", old.settings.listen)
            metrics = ("metrics_listen", "metrics_textfile", "metrics_interval")
            if any(getattr(settings, name) != getattr(old.settings, name) for name in metrics):
                log.warning("the metrics settings change only with a restart")
                settings = attrs.evolve(settings, **{name: getattr(old.settings, name) for name in metrics})
            if options.blob_cache != old.options.blob_cache:
                log.warning("the blob cache directory changes only with a restart (still %s)", old.options.blob_cache)
            elif self._store is not None:
                self._store.max_bytes = options.blob_cache_max
            self._settings = attrs.evolve(settings, listen=old.settings.listen)
            self._ledger.limits = settings.limits
            self._generation = self._new_generation(options, self._settings)
            if old.connections == 0:
                self._retire(old)
            log.info("configuration reloaded; new connections use it")
        finally:
            systemd.notify("READY=1")

    def _retire(self, generation: _Generation) -> None:
        """Close the registry client of a generation nobody uses any more."""
        assert self._background is not None
        registry = generation.resources.registry
        if registry in self._registries:
            self._registries.remove(registry)
            self._background.start_soon(registry.aclose)

    # ----------------------------------------------------------------------------- connections

    async def _accept_loop(self, connections: trio.Nursery) -> None:
        systemd.notify(f"READY=1\nSTATUS=serving on {self._settings.listen}")
        log.info("serving on %s", self._settings.listen)
        while True:
            try:
                conn, _ = await self._listener.accept()
            except OSError as e:
                log.error("cannot accept a connection: %s", e.strerror or e)
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            connections.start_soon(self._serve_connection, conn)

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                peer = peer_credentials(conn)  # type: ignore[arg-type]  # trio sockets have getsockopt
            except OSError as e:
                log.warning("refused a connection whose peer credentials cannot be read: %s", e.strerror)
                return
            generation = self._generation
            assert generation is not None
            if not generation.settings.access.allows(peer):
                log.warning("refused connection from %s: not on the allow-list", _describe(peer))
                return
            refused = self._ledger.connect(peer.uid)
            if refused is not None:
                log.warning("refused connection from %s: %s", _describe(peer), refused)
                await self._refuse(conn, refused)
                return
            log.info("connection from %s", _describe(peer))
            generation.connections += 1
            session = Session(
                conn, generation.options, generation.resources, peer=peer, ledger=self._ledger, on_idle=self._active
            )
            self._sessions.add(session)
            try:
                await session.run()
            finally:
                self._sessions.discard(session)
                self._active()
                self._ledger.disconnect(peer.uid)
                generation.connections -= 1
                if generation is not self._generation and generation.connections == 0:
                    self._retire(generation)
                log.info("connection from pid %d closed", peer.pid)

    def _active(self) -> None:
        """A session may have become idle, or ended: let a waiting shutdown look again."""
        self._activity.set()

    async def _refuse(self, conn: trio.socket.SocketType, why: str) -> None:
        """Tell a refused client why: its first request gets the reason as an error reply (briefly; a client that
        sends nothing, or too many refused at once, just sees the socket closed)."""
        if self._refusals >= _MAX_REFUSALS:
            return
        self._refusals += 1
        try:
            with trio.move_on_after(_REFUSAL_WAIT):
                if await conn.recv(1):  # the first request (cut short: its content does not matter)
                    await conn.send(encode_reply(Reply.failure(f"image-proxy daemon: connection refused: {why}")))
        except OSError:
            pass
        finally:
            self._refusals -= 1


def _describe(peer: PeerCredentials) -> str:
    command = ""
    with contextlib.suppress(OSError):
        command = Path(f"/proc/{peer.pid}/comm").read_text().strip()
    unit = systemd_unit(peer.pid)
    return f"{peer}" + (f" ({command})" if command else "") + (f" in {unit}" if unit else "")
