"""File descriptors over a unix socket (SCM_RIGHTS), for both ends of the protocol: written once."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterable

_FD_SIZE = array.array("i").itemsize


def ancillary_space(count: int) -> int:
    """The ``recvmsg`` ancillary buffer size for up to ``count`` fds."""
    return socket.CMSG_SPACE(count * _FD_SIZE)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS message received (a truncated trailing int is ignored)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % _FD_SIZE]))
    return fds


def fds_to_ancillary(fds: Iterable[int]) -> list[tuple[int, int, array.array]]:
    """The ancillary data that passes ``fds`` with ``sendmsg``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def close_fds(fds: Iterable[int]) -> None:
    """Close fds received or about to be sent, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["ancillary_space", "close_fds", "fds_from_ancillary", "fds_to_ancillary"]
