"""Hosts as Linux network namespaces, joined by one switch: the fleet's network, on this machine only.

``network(["upstream", "cache", "node-0", ...])`` makes one namespace per host plus a "switch" namespace holding a
bridge; each host gets ``eth0`` (one end of a veth pair, the other end enslaved to the bridge in the switch) with
an address of :data:`SUBNET`. Every interface and address lives inside these namespaces: the root namespace gets
none, so nothing outside the fleet can reach it or be reached from it. Leaving the block deletes the namespaces
(which deletes their interfaces).

A process runs on a host with :meth:`Host.command` (``ip netns exec``); code of this process runs there with
:func:`run_in` (a new thread that joins the namespace, so no thread of a pool is ever left in it).

Making namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and ``ip`` (iproute2); without them
:class:`FleetUnavailable` says what is missing (the tests fail with it, they never skip).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import attrs

T = TypeVar("T")

#: the fleet's addresses (a /24 inside the namespaces only); hosts get .2, .3, ... in the order given
SUBNET = "10.213.0"
CLONE_NEWNET = 0x40000000
#: the longest one ``ip`` command may take
IP_TIMEOUT = 20.0


class FleetUnavailable(RuntimeError):
    """The namespaces cannot be made here; the message says what is missing."""


@attrs.frozen
class Host:
    role: str  # "upstream", "cache", "node-3", ...
    netns: str  # the namespace's name (under /run/netns)
    address: str  # its eth0 address

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def call(self, function: Callable[..., T], *args: object, timeout: float = 60.0) -> T:
        """``function(*args)`` run by a thread of this process inside the namespace; see :func:`run_in`."""
        return run_in(self.netns, function, *args, timeout=timeout)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    try:
        result = subprocess.run([ip, *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    except FileNotFoundError:
        raise FleetUnavailable(
            "the fleet needs 'ip' (Debian package iproute2; ./setup.sh --test installs it)"
        ) from None
    if check and result.returncode != 0:
        raise FleetUnavailable(
            f"'ip {' '.join(args)}' failed ({result.returncode}): {result.stderr.strip()} -- the fleet's hosts are "
            "network namespaces, which need root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2 and a kernel with "
            "network namespaces and veth/bridge support"
        )
    return result


_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def run_in(netns: str, function: Callable[..., T], *args: object, timeout: float = 60.0) -> T:
    """Call ``function(*args)`` in a new thread that first joins the network namespace ``netns`` (sockets it
    makes belong there); return its result or raise its exception. The thread ends with the call. ``timeout``
    bounds the wait (TimeoutError)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            _enter(netns)
            outcome["value"] = function(*args)
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(function, '__name__', function)} in {netns} took over {timeout} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class Network:
    """The hosts made so far, by role; see the module docstring."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.switch = f"{prefix}sw"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def _make_switch(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, role: str) -> Host:
        number = len(self.hosts) + 2
        if number > 250:
            raise ValueError("at most 249 hosts")
        host = Host(role, f"{self.prefix}{role}", f"{SUBNET}.{number}")
        _ip("netns", "add", host.netns)
        self._made.append(host.netns)
        port = f"p{number}"  # the switch's end, named by host number (interface names are short)
        _ip("-n", host.netns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[role] = host
        return host

    def cut(self, source: Host, target: Host) -> None:
        """From now on ``source`` cannot reach ``target`` (connects fail at once: an unreachable route);
        the other direction and every other pair are untouched."""
        _ip("-n", source.netns, "route", "add", "unreachable", f"{target.address}/32")

    def restore(self, source: Host, target: Host) -> None:
        """Undo :meth:`cut`."""
        _ip("-n", source.netns, "route", "del", "unreachable", f"{target.address}/32")

    def close(self) -> None:
        """Delete every namespace made (their interfaces go with them)."""
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()


@contextlib.contextmanager
def network(roles: Sequence[str], prefix: str | None = None) -> Iterator[Network]:
    """A switch and one host per role (addresses in role order); all deleted when the block ends."""
    if os.geteuid() != 0:
        raise FleetUnavailable(
            f"the fleet's hosts are network namespaces: making them needs root (this is uid {os.geteuid()})"
        )
    net = Network(prefix or f"fl{os.getpid()}-")
    try:
        net._make_switch()
        for role in roles:
            net.add(role)
        yield net
    finally:
        net.close()
