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


#: the kinds of systemd unit a process runs in, as the last part of its cgroup path
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".slice")


def systemd_unit(pid: int) -> str | None:
    """The systemd unit process ``pid`` runs in (``zincati.service``, ``session-3.scope``), from its cgroup
    (``/proc/PID/cgroup``, the unified hierarchy, else systemd's named one); None when it has none or is gone. A
    unit of a user's manager (``user@1000.service/app.slice/x.service``) is named by its innermost unit."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read(8192).splitlines()
    except OSError:
        return None
    paths = [line.split(":", 2)[2] for line in lines if line.count(":") >= 2]
    chosen = next((p for line, p in zip(lines, paths, strict=True) if line.startswith("0::")), None)
    if chosen is None:
        chosen = next((p for line, p in zip(lines, paths, strict=True) if ":name=systemd:" in line), None)
    if not chosen:
        return None
    for part in reversed(chosen.strip().split("/")):
        if part.endswith(_UNIT_SUFFIXES) and not part.endswith(".slice"):
            return part
    return None


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
