"""A spawned proxy that relays its client to the host's daemon (issue 22).

An update agent spawns ``image-proxy experimental-image-proxy`` with flags it chooses; with ``[spawned] daemon =
"/run/image-proxy/image-proxy.sock"`` in the settings file that process connects to the daemon and passes every
packet on, both ways, file descriptors included (SCM_RIGHTS): the agent gets the daemon's shared cache, single
flight, metrics and limits while speaking to what it thinks is its own proxy. The daemon sees the relay's
credentials, which are the agent's (same uid; the relay's pid).

What keeps the promises of the spawned mode: one connection to the daemon, so replies in order stay in order;
EOF of either side ends the other (the daemon ends the session, and its transfers, as for any client that
leaves); ``Shutdown`` is passed on, the daemon closes the connection, and the relay exits. Flags that change
what a proxy does (credentials, ``--tls-verify``, overrides, policy, caches, deadlines) are this process's
settings, which the daemon would not apply: a client that gives one is served by this process itself, with one
log line naming them, never silently ignored. So is a client whose daemon is not running or refuses it.
"""

from __future__ import annotations

import json
import logging
import select
import socket

from protocol import MAX_MSG_SIZE
from protocol.fds import ancillary_space, close_fds, fds_from_ancillary, fds_to_ancillary

log = logging.getLogger("image-proxy")

#: how long the relay waits for the daemon to accept it before serving the client itself
CONNECT_TIMEOUT = 1.0
#: fds one reply may carry (GetRawBlob: two)
_REPLY_FDS = 16


def connect(path: str) -> socket.socket | str:
    """A connection to the daemon's socket that the daemon took, or why there is none (within
    :data:`CONNECT_TIMEOUT`). A daemon that refuses a client (allow-list, connection limits) answers its first
    request with the reason, or closes the socket: the relay asks ``GetCapabilities`` first, keeps the answer to
    itself, and relays only once the daemon answered it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
        sock.send(_PROBE)
        answer = sock.recv(MAX_MSG_SIZE)
    except TimeoutError:
        sock.close()
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    except OSError as e:
        sock.close()
        return e.strerror or str(e)
    refusal = _refusal(answer)
    if refusal is not None:
        sock.close()
        return refusal
    sock.settimeout(None)
    return sock


#: the request that tells a daemon that takes the relay from one that refuses it (no Initialize needed)
_PROBE = b'{"method":"GetCapabilities","args":[]}'


def _refusal(answer: bytes) -> str | None:
    """Why the daemon did not take the relay, from its answer to the probe; None if it did."""
    if not answer:
        return "the daemon closed the connection"
    try:
        reply = json.loads(answer)
    except ValueError:
        return "the daemon's answer is not JSON"
    if not isinstance(reply, dict) or reply.get("success") is not True:
        error = reply.get("error") if isinstance(reply, dict) else None
        return f"the daemon refused: {error}" if isinstance(error, str) and error else "the daemon refused"
    return None


def relay(client: socket.socket, daemon: socket.socket) -> None:
    """Pass packets both ways until either side ends; both sockets are closed on return.

    A plain poll loop, no event loop: a relayed round trip crosses this process twice, and trio's scheduling
    cost more than the system calls (the relay needs nothing else). Writes block: a client that does not read
    its replies stops the relay from reading the daemon, whose own limits then apply to it, as to any client."""
    poller = select.poll()
    poller.register(client, select.POLLIN)
    poller.register(daemon, select.POLLIN)
    client_fd = client.fileno()
    try:
        while True:
            for fd, _ in poller.poll():
                forward = _request if fd == client_fd else _reply
                if not forward(client, daemon):
                    return
    finally:
        client.close()
        daemon.close()


def _request(client: socket.socket, daemon: socket.socket) -> bool:
    try:
        data, ancdata, _, _ = client.recvmsg(MAX_MSG_SIZE + 1, ancillary_space(4))
    except OSError as e:
        log.debug("relay: reading the client: %s", e.strerror or e)
        return False
    close_fds(fds_from_ancillary(ancdata))  # clients never send descriptors
    if not data:
        log.debug("relay: the client closed the connection")
        return False
    try:
        daemon.send(data)  # one longer than any request the daemon takes: it says so, as it would to the client
    except OSError as e:
        log.warning("relay: the daemon's connection failed: %s", e.strerror or e)
        return False
    return True


def _reply(client: socket.socket, daemon: socket.socket) -> bool:
    try:
        data, ancdata, _, _ = daemon.recvmsg(MAX_MSG_SIZE, ancillary_space(_REPLY_FDS))
    except OSError as e:
        log.warning("relay: the daemon's connection failed: %s", e.strerror or e)
        return False
    fds = fds_from_ancillary(ancdata)
    try:
        if not data:
            log.debug("relay: the daemon closed the connection")
            return False
        client.sendmsg([data], fds_to_ancillary(fds) if fds else [])
    except OSError as e:
        log.debug("relay: writing to the client: %s", e.strerror or e)
        return False
    finally:
        close_fds(fds)  # the client has its own copies now
    return True


__all__ = ["CONNECT_TIMEOUT", "connect", "relay"]
