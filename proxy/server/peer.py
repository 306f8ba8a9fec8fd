"""Who is on the other end of a unix socket (SO_PEERCRED, SO_PEERGROUPS) and whether they may talk to us."""

from __future__ import annotations

import array
import socket
import struct

import attrs

#: SO_PEERGROUPS (Linux 4.13+); Python does not name it
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")


@attrs.frozen
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    #: the peer's supplementary groups when the kernel tells them, else just its primary group
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials the peer had when it connected. Raises OSError if the socket cannot tell."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    groups = {gid}
    size = 4 * 256
    for _ in range(3):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == 34:  # ERANGE: more groups than fit; the kernel wants a bigger buffer
                size *= 16
                continue
            break  # an old kernel: the primary group only
        groups.update(array.array("I", raw[: len(raw) - len(raw) % 4]))
        break
    return PeerCredentials(pid, uid, gid, frozenset(groups))


@attrs.frozen
class AccessPolicy:
    """Allow-lists of uids and gids; both empty: everyone who can open the socket may talk."""

    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    @property
    def open(self) -> bool:
        return not self.allow_uids and not self.allow_gids

    def allows(self, peer: PeerCredentials) -> bool:
        return self.open or peer.uid in self.allow_uids or bool(peer.groups & self.allow_gids)
