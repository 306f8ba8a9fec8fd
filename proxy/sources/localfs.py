"""Local files a client names (``oci:``, ``dir:``, the archives): opened so that nothing blocks, nothing leads out
of the image, and, in the daemon, nothing is read that the client could not read itself.

- **Nothing blocks.** Every open is ``O_NONBLOCK | O_NOCTTY`` and followed by ``fstat``: a FIFO, socket or
  device named where a file is expected is an error naming the path, before any read (a plain ``open()`` of a
  FIFO waits for a writer forever, holding a worker thread).
- **Nothing escapes.** A layout is opened once as a directory fd; every file in it is opened relative to that
  fd with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``, so a symlink or ``..`` that leads out of the
  layout is refused by the kernel, with no window between a check and the open. An absolute symlink (which
  openat2 refuses even when it points inside), a kernel before 5.6 or a seccomp filter without openat2 get the
  realpath check, then an ``O_NOFOLLOW`` open.
- **The path that is opened is the path the policy sees.** ``LocalDir.real_path`` is what the kernel resolved
  when it opened the directory (``/proc/self/fd``), not the reference's text: ``oci:$B/S/../trusted`` with
  ``S`` a symlink is matched where it really leads.
- **A client reads only what it could read itself.** In the daemon every open runs in the worker thread with
  the client's filesystem identity: ``setfsuid``/``setfsgid``/``setgroups`` as raw syscalls, which change
  only the calling thread's credentials (glibc's wrappers would change every thread's). The kernel then
  makes every permission decision (mode bits, ACLs, the loss of ``CAP_DAC_OVERRIDE`` for a non-root fsuid) on
  every path component, exactly as for the client's own ``open``. The fds so opened are read afterwards
  like any other. Why this rather than checking mode bits ourselves (ACLs, LSMs and capabilities would be
  guessed) or asking clients for a directory fd (no existing client sends one): the protocol stays as it is
  and the kernel decides. A daemon that cannot take the client's identity (not root, no ``CAP_SETUID``)
  serves local paths only to clients of its own uid and to root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs

T = TypeVar("T")

#: flags of every open of a client-named file
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


@attrs.frozen
class Identity:
    """Whose permissions a file access is checked against (a daemon's client: its SO_PEERCRED)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"uid {self.uid} gid {self.gid}"


class LocalPathError(OSError):
    """A client-named path that cannot be used; ``str()`` names the path and why, Go-style."""

    def __init__(self, err: int, reason: str, path: str) -> None:
        super().__init__(err, reason, path)

    def __str__(self) -> str:
        return f"open {self.filename}: {self.strerror}"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


# ------------------------------------------------------------------------------------------ per-thread identity

_SYSCALLS = {
    # machine: (setgroups, setfsuid, setfsgid)
    "x86_64": (116, 122, 123),
    "aarch64": (159, 151, 152),
}
_OPENAT2 = 437  # the same on every architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_numbers = _SYSCALLS.get(platform.machine())


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _set_fsuid(uid: int) -> int:
    """setfsuid(2) for this thread; returns the previous fsuid (it cannot report failure: see _fsuid)."""
    assert _numbers is not None
    return _libc.syscall(ctypes.c_long(_numbers[1]), ctypes.c_uint(uid))


def _set_fsgid(gid: int) -> int:
    assert _numbers is not None
    return _libc.syscall(ctypes.c_long(_numbers[2]), ctypes.c_uint(gid))


def _fsuid() -> int:
    return _set_fsuid(0xFFFFFFFF)  # an invalid id changes nothing and returns the current one


def _fsgid() -> int:
    return _set_fsgid(0xFFFFFFFF)


def _set_groups(groups: tuple[int, ...] | list[int]) -> None:
    assert _numbers is not None
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    _syscall(_numbers[0], ctypes.c_size_t(len(groups)), array)


def _can_switch() -> bool:
    """Whether this process may take another identity for file access (root, or CAP_SETUID + CAP_SETGID)."""
    if _numbers is None:
        return False
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << 7)) and bool(caps & (1 << 6))  # CAP_SETUID, CAP_SETGID
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


_SWITCH_LOCK = threading.Lock()
_switch_possible: bool | None = None


def switch_possible() -> bool:
    global _switch_possible
    with _SWITCH_LOCK:
        if _switch_possible is None:
            _switch_possible = _can_switch()
        return _switch_possible


class IdentityUnavailable(PermissionError):
    """This process cannot check files as the client (no CAP_SETUID): local paths are refused to that client."""


def needs_switch(identity: Identity | None) -> bool:
    """Whether accesses for ``identity`` must run with its credentials (not for root, nor for our own user with
    our groups)."""
    if identity is None or identity.uid == 0:
        return False
    return not (identity.uid == os.geteuid() and set(identity.groups) <= {os.getegid(), *os.getgroups()})


@contextlib.contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    """Run the block, in this thread, with ``identity``'s filesystem credentials (synchronous: call it in a
    worker thread). Restores ours after; a thread that cannot be restored ends the process rather than serve
    another client with a stranger's rights."""
    if not needs_switch(identity):
        yield
        return
    assert identity is not None
    if not switch_possible():
        raise IdentityUnavailable(
            errno.EACCES,
            f"this daemon (uid {os.geteuid()}) cannot open local paths as {identity}: it runs without CAP_SETUID; "
            "use a registry reference, or pass the image from a process of the daemon's user",
        )
    old_uid, old_gid = _fsuid(), _fsgid()
    old_groups = os.getgroups()
    try:
        _set_groups(tuple(identity.groups) or (identity.gid,))
        _set_fsgid(identity.gid)
        _set_fsuid(identity.uid)
        if _fsuid() != identity.uid or _fsgid() != identity.gid:
            raise IdentityUnavailable(errno.EPERM, f"cannot take the file identity of {identity}")
        yield
    finally:
        _set_fsuid(old_uid)
        _set_fsgid(old_gid)
        with contextlib.suppress(OSError):
            _set_groups(old_groups)
        if _fsuid() != old_uid or _fsgid() != old_gid or sorted(os.getgroups()) != sorted(old_groups):
            os.write(2, b"image-proxy: FATAL: a worker thread could not take back the daemon's credentials\n")
            os._exit(70)


def as_identity(identity: Identity | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with ``identity``'s filesystem credentials (in a worker thread)."""
    with acting_as(identity):
        return fn(*args)


# ------------------------------------------------------------------------------------------ opening


def _checked(fd: int, path: str, want_dir: bool = False) -> os.stat_result:
    try:
        st = os.fstat(fd)
        ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
        if not ok:
            what = "a directory" if want_dir else "a regular file"
            raise LocalPathError(errno.EINVAL, f"is {_kind(st.st_mode)}, not {what}", path)
    except BaseException:
        os.close(fd)
        raise
    return st


def _check_name(path: str) -> None:
    """A name the kernel can take: no NUL, nothing UTF-8 cannot encode (LocalPathError otherwise)."""
    if "\x00" in path:
        raise LocalPathError(errno.EINVAL, "the name holds a NUL character", path.replace("\x00", "\\x00"))
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise LocalPathError(errno.EINVAL, "the name is not valid Unicode", ascii(path)) from None


def open_regular_file(path: str, identity: Identity | None = None) -> tuple[int, os.stat_result]:
    """Open a client-named file (an archive) for reading, as ``identity``: never blocks, never a FIFO, socket or
    device (LocalPathError naming it). Synchronous: call it in a worker thread. (fd, its stat)."""
    _check_name(path)
    with acting_as(identity):
        fd = os.open(path, _OPEN_FLAGS)
    return fd, _checked(fd, path)


def resolved_path(fd: int, fallback: str) -> str:
    """The path the kernel opened as ``fd`` (symlinks and ``..`` resolved), for policy scopes and messages."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)
    return target if target.startswith("/") else os.path.realpath(fallback)


_openat2_works: bool | None = None


def _openat2(dir_fd: int, relative: str) -> int:
    """openat2 confined beneath ``dir_fd``; raises NotImplementedError where the kernel (or a filter) lacks it."""
    global _openat2_works
    if _openat2_works is False:
        raise NotImplementedError
    how = _OpenHow(flags=_OPEN_FLAGS, mode=0, resolve=_RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    try:
        fd = _syscall(_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(relative), ctypes.byref(how), ctypes.sizeof(how))
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:
            _openat2_works = False
            raise NotImplementedError from None
        raise
    _openat2_works = True
    return fd


class LocalDir:
    """A directory a client named (a layout, a ``dir:`` image, a shared blob directory), opened once; files in it
    are opened relative to it, confined beneath it, as the client. Synchronous: use it in worker threads."""

    def __init__(self, path: str, identity: Identity | None = None) -> None:
        """Raises LocalPathError/OSError (naming ``path``) when it is not a directory the client may search."""
        self.path = path
        self.identity = identity
        _check_name(path)
        with acting_as(identity):
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd: int | None = fd
        self.real_path = resolved_path(fd, path)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: directory closed")
        return self._fd

    def _display(self, relative: str) -> str:
        return os.path.join(self.path, relative)

    def open(self, relative: str) -> tuple[int, os.stat_result]:
        """Open the regular file ``relative`` (inside this directory) for reading: (fd, stat). FileNotFoundError,
        PermissionError (also for a path leading outside), LocalPathError (not a regular file)."""
        shown = self._display(relative)
        _check_name(relative)
        try:
            with acting_as(self.identity):
                try:
                    fd = _openat2(self.fileno(), relative)
                except NotImplementedError:
                    fd = self._open_checked(relative)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    # an absolute symlink (openat2 refuses them all): followed if it resolves inside
                    fd = self._open_checked(relative)
        except OSError as e:
            if e.errno == errno.EXDEV or e.errno == errno.ELOOP:
                raise PermissionError(errno.EACCES, "path leads outside the image directory", shown) from None
            raise type(e)(e.errno, e.strerror, shown) from None
        return fd, _checked(fd, shown)

    def _open_checked(self, relative: str) -> int:
        """Without openat2: resolve, check it stays inside, open without following a last symlink."""
        root = self.real_path
        real = os.path.realpath(os.path.join(root, relative))
        if os.path.commonpath([root, real]) != root:
            raise OSError(errno.EXDEV, "path leads outside the image directory")
        return os.open(real, _OPEN_FLAGS | os.O_NOFOLLOW)

    def read(self, relative: str, limit: int) -> bytes:
        """The whole (small) file ``relative``; OSError(EFBIG) beyond ``limit`` bytes."""
        fd, st = self.open(relative)
        try:
            if st.st_size > limit:
                raise OSError(errno.EFBIG, f"file larger than {limit} bytes", self._display(relative))
            chunks = []
            pos = 0
            while data := os.pread(fd, 1 << 20, pos):
                chunks.append(data)
                pos += len(data)
                if pos > limit:
                    raise OSError(errno.EFBIG, f"file larger than {limit} bytes", self._display(relative))
            return b"".join(chunks)
        finally:
            os.close(fd)

    def exists(self, relative: str) -> bool:
        try:
            fd, _ = self.open(relative)
        except FileNotFoundError:
            return False
        os.close(fd)
        return True

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> LocalDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "Identity",
    "IdentityUnavailable",
    "LocalDir",
    "LocalPathError",
    "acting_as",
    "as_identity",
    "needs_switch",
    "open_regular_file",
    "resolved_path",
]
