"""The two systemd interfaces the daemon uses, without libsystemd: socket activation (``LISTEN_FDS``) and
readiness notification (``NOTIFY_SOCKET``). See sd_listen_fds(3) and sd_notify(3)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

#: the first fd systemd passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The socket-activation environment is there but unusable."""


def listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The fds passed by socket activation, with their names (``LISTEN_FDNAMES``, else ``unknown``).

    Empty when the environment is not meant for this process (no ``LISTEN_FDS``, or ``LISTEN_PID`` names
    another process, as after a fork).
    """
    count = environ.get("LISTEN_FDS")
    if count is None:
        return []
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is not None:
        try:
            if int(listen_pid) != pid:
                return []
        except ValueError:
            raise ActivationError(f"LISTEN_PID={listen_pid!r} is not a process id") from None
    try:
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from None
    if not 0 <= n <= 1024:
        raise ActivationError(f"LISTEN_FDS={count!r} is out of range")
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    names += ["unknown"] * (n - len(names))
    return [(LISTEN_FDS_START + i, names[i]) for i in range(n)]


def clear_activation_environment() -> None:
    """So that processes we start (credential helpers) do not think the sockets are theirs."""
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to the service manager, if there is one.
    Returns whether it was sent; never raises (a daemon does not die because systemd went away)."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        return False
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), address)
        return True
    return False
