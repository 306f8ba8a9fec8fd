"""A spawned proxy that relays its client to the host's daemon (issue 22).

An update agent spawns ``image-proxy experimental-image-proxy`` with flags it chooses; with ``[spawned] daemon =
"/run/image-proxy/image-proxy.sock"`` in the settings file that process connects to the daemon and passes every
packet on, both ways, file descriptors included (SCM_RIGHTS): the agent gets the daemon's shared cache, single
flight, metrics and limits while speaking to what it thinks is its own proxy. The daemon sees the relay's
credentials, which are the agent's (same uid; the relay's pid).

What keeps the promises of the spawned mode: one connection to the daemon, so replies in order stay in order;
EOF of either side ends the other (the daemon ends the session, and its transfers, as for any client that
leaves); ``Shutdown`` is passed on, the daemon closes the connection, and the relay exits. The client's
credentials and user agent (``--authfile``, ``--creds``, ``--no-creds``, ``--user-agent-prefix``, ...; an update
agent's usual flags) are forwarded as the connection's settings (``SetSessionSettings``, docs/PROTOCOL.md); the
auth file is read here. Other flags that change what a proxy does (``--tls-verify``, ``--cert-dir``, overrides,
policy, caches, deadlines) are this process's settings, which the daemon would not apply: a client that gives one
is served by this process itself, with one log line naming them, never silently ignored. So is a client whose
daemon is not running, refuses it, or refuses its settings.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket

from protocol import MAX_MSG_SIZE
from protocol.fds import ancillary_space, close_fds, fds_from_ancillary, fds_to_ancillary

log = logging.getLogger("image-proxy")

#: how long the relay waits for the daemon to accept it before serving the client itself
CONNECT_TIMEOUT = 1.0
#: fds one reply may carry (GetRawBlob: two)
_REPLY_FDS = 16


def session_settings(given: dict[str, object]) -> dict[str, object] | str:
    """The ``SetSessionSettings`` object for the client's forwarded flags (``SESSION_FLAGS`` by argparse name, the
    ones the client gave), or why they cannot be forwarded. ``--authfile`` is read here, in the agent's process:
    ``/proc/self/fd/100`` is the agent's descriptor, which the daemon cannot open."""
    settings: dict[str, object] = {}
    for name, value in given.items():
        if name == "authfile":
            path = str(value)
            if not path:
                continue  # --authfile "": skopeo's default files, which the daemon's are for its clients
            try:
                with open(path, "rb") as file:
                    content = file.read(_MAX_AUTH_FILE + 1)
            except FileNotFoundError:
                content = b""  # no file holds no credentials, as for skopeo
            except OSError as e:
                return f"cannot read the auth file {path}: {e.strerror or e}"
            if len(content) > _MAX_AUTH_FILE:
                return f"the auth file {path} is larger than a request to the daemon can carry"
            try:
                settings["auth_file"] = content.decode("utf-8")
            except UnicodeDecodeError:
                return f"the auth file {path} is not UTF-8"
            settings["auth_file_name"] = path
        else:
            settings[name] = value
    return settings


#: the largest auth file a relay forwards (its request must fit in one packet, escapes included)
_MAX_AUTH_FILE = MAX_MSG_SIZE // 2


def auth_file_copy(settings: dict[str, object]) -> str | None:
    """For a client this process serves itself after it read its auth file: a copy of what it read (a memfd, as
    ``/proc/self/fd/N``), since the file may be a pipe that one reading emptied; None when there is nothing to copy."""
    content = settings.get("auth_file")
    if not isinstance(content, str) or not content:
        return None
    fd = os.memfd_create("auth.json", 0)  # inheritable: the path names it in this process only
    os.write(fd, content.encode("utf-8"))
    return f"/proc/self/fd/{fd}"


def connect(path: str, settings: dict[str, object] | None = None) -> socket.socket | str:
    """A connection to the daemon's socket that the daemon took, or why there is none (within
    :data:`CONNECT_TIMEOUT`). A daemon that refuses a client (allow-list, connection limits) answers its first
    request with the reason, or closes the socket: the relay asks ``GetCapabilities`` first, keeps the answer to
    itself, and relays only once the daemon answered it. ``settings`` (the client's forwarded flags) go next, as
    ``SetSessionSettings``; a daemon without the extension, or that refuses them, does not take the relay."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
        refusal = _refusal(_ask(sock, _PROBE), "session-settings" if settings else None)
        if refusal is None and settings:
            request = json.dumps({"method": "SetSessionSettings", "args": [settings]}).encode()
            if len(request) > MAX_MSG_SIZE:
                refusal = "the client's settings are larger than a request to the daemon can carry"
            else:
                refusal = _refusal(_ask(sock, request))
    except TimeoutError:
        refusal = f"no answer within {CONNECT_TIMEOUT:g} s"
    except OSError as e:
        refusal = e.strerror or str(e)
    if refusal is not None:
        sock.close()
        return refusal
    sock.settimeout(None)
    return sock


def _ask(sock: socket.socket, request: bytes) -> bytes:
    sock.send(request)
    return sock.recv(MAX_MSG_SIZE)


#: the request that tells a daemon that takes the relay from one that refuses it (no Initialize needed)
_PROBE = b'{"method":"GetCapabilities","args":[]}'


def _refusal(answer: bytes, extension: str | None = None) -> str | None:
    """Why the daemon did not take the relay, from its answer; None if it did (and, for the probe, lists
    ``extension``)."""
    if not answer:
        return "the daemon closed the connection"
    try:
        reply = json.loads(answer)
    except ValueError:
        return "the daemon's answer is not JSON"
    if not isinstance(reply, dict) or reply.get("success") is not True:
        error = reply.get("error") if isinstance(reply, dict) else None
        return f"the daemon refused: {error}" if isinstance(error, str) and error else "the daemon refused"
    if extension is not None and extension not in (reply.get("value") or ()):
        return f"the daemon does not take a client's settings (no extension {extension})"
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


__all__ = ["CONNECT_TIMEOUT", "auth_file_copy", "connect", "relay", "session_settings"]
