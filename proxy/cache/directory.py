"""A blob cache directory walked without ever leaving it: ``DIR/blobs`` and ``DIR/blobs/<algo>`` are opened
without following symlinks, and every later access is relative to those directory descriptors, so nothing
outside DIR is read or removed, and no symlink is followed or removed. Used by the store's eviction and by
``image-proxy cache``; the store opens its own paths with :func:`open_subdir` and :func:`open_regular`, the same way.

What the store creates is private: directories ``0700``, files ``0600`` (an existing DIR keeps its mode, as systemd's
``CacheDirectoryMode=`` set it)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from protocol.digests import DIGEST_HEX_LENGTHS

PARTIAL_SUFFIX = ".partial"
#: the mode of what the cache creates: DIR (when it does not exist), blobs/, blobs/<algo>/, blobs and partials
DIR_MODE = 0o700
FILE_MODE = 0o600

_HEX = re.compile(r"[0-9a-f]+")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
Kind = Literal["blob", "partial", "foreign"]


class CacheDirError(Exception):
    """DIR cannot be used at all (exit code 2)."""


class Changed(Exception):
    """The file is no longer the one that was scanned (replaced, removed or used meanwhile)."""


class Refused(Exception):
    """A path under DIR is not what the cache puts there (a symbolic link, not a directory or regular file, a
    hard-linked partial): it is never followed, written or removed. The text names it and says why."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def _what_is(dir_fd: int, name: str, expected: str) -> str:
    """What ``name`` is instead of ``expected``, for a refusal (looked at with ``lstat``, never followed)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        return f"cannot be opened: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link (never followed)"
    return f"not a {expected}"


def open_subdir(parent_fd: int, name: str, path: Path, *, create: bool) -> int:
    """The directory ``name`` under ``parent_fd`` (``path`` names it in messages), opened without following a
    symlink; with ``create`` made first (mode 0700) if missing. Raises Refused, or FileNotFoundError without
    ``create``."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(path, _what_is(parent_fd, name, "directory")) from None
        raise


def open_regular(dir_fd: int, name: str, path: Path, flags: int = os.O_RDONLY, mode: int = FILE_MODE) -> int:
    """The regular file ``name`` under ``dir_fd``, opened without following a symlink and without blocking on a
    FIFO (``flags`` may add ``O_RDWR | O_CREAT``: created with ``mode``). Raises Refused for anything else, and
    FileNotFoundError."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise Refused(path, _what_is(dir_fd, name, "regular file")) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(path, "not a regular file")
    return fd


@dataclass(frozen=True)
class Entry:
    """One name under ``DIR/blobs``, as it was when scanned (``lstat``: a symlink is described, not followed)."""

    algo: str  # the directory under blobs/ holding it; "" for a name directly in blobs/
    name: str
    kind: Kind
    size: int
    atime_ns: int
    mtime_ns: int
    ino: int
    why: str = ""  # foreign: what is wrong with it
    removable: bool = False  # foreign: a regular file directly inside blobs/<algo>/ (verify --repair removes it)
    uid: int = 0
    mode: int = 0
    nlink: int = 1

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def hexpart(self) -> str:
        return self.name.removesuffix(PARTIAL_SUFFIX)


def _entry(algo: str, name: str, st: os.stat_result, kind: Kind, why: str = "", removable: bool = False) -> Entry:
    return Entry(
        algo,
        name,
        kind,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ino,
        why,
        removable,
        st.st_uid,
        st.st_mode,
        st.st_nlink,
    )


def _classify(algo: str, name: str, st: os.stat_result) -> Entry:
    hexpart = name.removesuffix(PARTIAL_SUFFIX)
    digest_name = len(hexpart) == DIGEST_HEX_LENGTHS[algo] and _HEX.fullmatch(hexpart) is not None
    if stat.S_ISREG(st.st_mode):
        if digest_name:
            return _entry(algo, name, st, "partial" if hexpart != name else "blob")
        return _entry(algo, name, st, "foreign", f"not a {algo} digest name", removable=True)
    if stat.S_ISLNK(st.st_mode):
        return _entry(algo, name, st, "foreign", "a symbolic link (not followed)")
    if stat.S_ISDIR(st.st_mode):
        return _entry(algo, name, st, "foreign", "a directory")
    return _entry(algo, name, st, "foreign", "not a regular file")


def is_writable(path: Path, fd: int) -> bool:
    """Whether files under the directory ``fd`` (at ``path``) can be removed: not a read-only mount, and allowed."""
    return not os.fstatvfs(fd).f_flag & os.ST_RDONLY and os.access(path, os.W_OK)


def _scandir(fd: int) -> list[tuple[str, os.stat_result]]:
    found = []
    with os.scandir(fd) as it:
        for de in it:
            try:
                found.append((de.name, de.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return sorted(found, key=lambda item: item[0])


class CacheDir:
    """An open ``DIR/blobs``: scanning, opening and removing its entries without ever leaving it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self._algo_fds: dict[str, int] = {}
        try:
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CacheDirError(f"{root}: {e.strerror}") from None
        try:
            self.fd = os.open("blobs", _DIR_FLAGS, dir_fd=root_fd)
        except FileNotFoundError:
            raise CacheDirError(f"{root}: not a blob cache (it has no blobs/ directory)") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CacheDirError(f"{self.blobs}: not a directory (symbolic links are not followed)") from None
            raise CacheDirError(f"{self.blobs}: {e.strerror}") from None
        finally:
            os.close(root_fd)
        self.writable = is_writable(self.blobs, self.fd)

    def __enter__(self) -> CacheDir:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._algo_fds.values():
            os.close(fd)
        self._algo_fds.clear()
        os.close(self.fd)

    def path(self, entry: Entry) -> Path:
        return self.blobs / entry.algo / entry.name if entry.algo else self.blobs / entry.name

    def scan(self) -> list[Entry]:
        """Every name in blobs/ and in its sha256/ and sha512/ directories."""
        try:
            top = _scandir(self.fd)
        except OSError as e:
            raise CacheDirError(f"{self.blobs}: {e.strerror}") from None
        entries = []
        for name, st in top:
            if name in DIGEST_HEX_LENGTHS and stat.S_ISDIR(st.st_mode):
                entries += self._scan_algo(name, st)
            elif stat.S_ISLNK(st.st_mode):
                entries.append(_entry("", name, st, "foreign", "a symbolic link (not followed)"))
            else:
                entries.append(_entry("", name, st, "foreign", "not a digest algorithm directory (sha256, sha512)"))
        return entries

    def _scan_algo(self, algo: str, dir_st: os.stat_result) -> list[Entry]:
        try:
            fd = os.open(algo, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as e:
            return [_entry("", algo, dir_st, "foreign", f"cannot be read: {e.strerror}")]
        self._algo_fds[algo] = fd
        try:
            return [_classify(algo, name, st) for name, st in _scandir(fd)]
        except OSError as e:
            return [_entry("", algo, dir_st, "foreign", f"cannot be read: {e.strerror}")]

    def open(self, entry: Entry) -> int:
        """The entry's file, read-only (without touching its atime where allowed); Changed if it was replaced."""
        dir_fd = self._algo_fds[entry.algo]
        try:
            try:
                fd = os.open(entry.name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
            except PermissionError:  # O_NOATIME is for the file's owner only
                fd = os.open(entry.name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                raise Changed() from None
            raise
        if os.fstat(fd).st_ino != entry.ino:
            os.close(fd)
            raise Changed()
        return fd

    def lock_partial(self, entry: Entry) -> int | None:
        """The partial, open and locked (closing it unlocks); None when a download holds its lock."""
        fd = self.open(entry)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def remove(self, entry: Entry, *, same_atime: bool = False) -> None:
        """Unlink the entry if it is still the file scanned (and, with ``same_atime``, unused since)."""
        dir_fd = self._algo_fds[entry.algo]
        try:
            st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise Changed() from None
        if st.st_ino != entry.ino or not stat.S_ISREG(st.st_mode) or (same_atime and st.st_atime_ns != entry.atime_ns):
            raise Changed()
        os.unlink(entry.name, dir_fd=dir_fd)
