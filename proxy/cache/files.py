"""The blob cache's files, below the store and its downloads: verification stamps (and when one can be
believed), hashing a file, writing all of a buffer, creating private directories, removing a name only if it is
still the file we mean."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path

from protocol.errors import ProxyError
from proxy.cache.directory import DIR_MODE
from proxy.common.pipes import CHUNK_SIZE

STAMP_XATTR = "user.image-proxy.verified"
#: on a partial: a hash of the source its bytes came from (see source_tag)
SOURCE_XATTR = "user.image-proxy.source"
#: on a verified blob: the tags (source_tag) of the sources it was downloaded from, space-separated, oldest first
ORIGINS_XATTR = "user.image-proxy.origins"
#: the most origins a blob records (33 bytes each: within the 4 KiB an ext4 inode gives all its xattrs); a source
#: beyond them downloads the blob each time (tags are never dropped: nobody can push another's out)
MAX_ORIGINS = 64
#: the most refused paths logged at error level (then at debug level): a log line per path, not per request
MAX_REFUSALS_LOGGED = 1000


class StoreError(ProxyError):
    """The cache could not do what was asked (the text names the digest and the path)."""


def verification_stamp(st: os.stat_result) -> bytes:
    """The ``STAMP_XATTR`` value marking a file of this size and mtime as verified."""
    return f"{st.st_size}:{st.st_mtime_ns}".encode()


def write_stamp(target: int | Path, st: os.stat_result) -> bool:
    """Mark ``target`` (an fd or a path) verified; False where xattrs cannot be written (the file is then
    simply re-hashed on its next lookup)."""
    try:
        os.setxattr(target, STAMP_XATTR, verification_stamp(st))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EROFS):
            return False
        raise
    return True


def stamp_can_be_believed(st: os.stat_result, uid: int | None = None) -> bool:
    """Whether a stamp on a file like this proves anything: nobody but this process's user (or ``uid``) can have
    written the file (or its stamp) after it was verified. Otherwise the stamp is a claim, and the file is
    re-hashed."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == (os.geteuid() if uid is None else uid)
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and st.st_nlink == 1
    )


def has_valid_stamp(fd: int, st: os.stat_result) -> bool:
    """The open file carries a stamp for its current size and mtime, and the stamp can be believed."""
    if not stamp_can_be_believed(st):
        return False
    try:
        return os.getxattr(fd, STAMP_XATTR) == verification_stamp(st)
    except OSError:
        return False


def source_tag(source: str) -> bytes:
    """What a partial records of the source its bytes came from (``SOURCE_XATTR``), and a blob of each of its
    origins (``ORIGINS_XATTR``): 128 bits of its SHA-256, beyond any search for a name that collides with another's."""
    return hashlib.sha256(source.encode()).hexdigest()[:32].encode()


def origins_can_be_believed(st: os.stat_result, owner: int) -> bool:
    """Whether the origins recorded on a file like this can be believed: :func:`stamp_can_be_believed` for this
    process's user or for ``owner``, the cache directory's (a proxy spawned as root reads the daemon user's blobs)."""
    return stamp_can_be_believed(st) or stamp_can_be_believed(st, owner)


def has_origin(fd: int, st: os.stat_result, tag: bytes, owner: int) -> bool:
    """Whether the blob open as ``fd`` records ``tag`` among its origins (``ORIGINS_XATTR``), on a file whose origins
    can be believed (:func:`origins_can_be_believed`). No record, no origin."""
    if not origins_can_be_believed(st, owner):
        return False
    try:
        return tag in os.getxattr(fd, ORIGINS_XATTR).split()
    except OSError:
        return False


def add_origin(fd: int, tag: bytes) -> bool:
    """Record ``tag`` among the origins of the verified blob open as ``fd``; False where xattrs cannot be written
    (that source then downloads the blob again next time). Two processes adding at once may lose one of the two
    tags: the same cost, once."""
    try:
        current = os.getxattr(fd, ORIGINS_XATTR).split()
    except OSError:
        current = []
    if tag in current:
        return True
    if len(current) >= MAX_ORIGINS:
        return False
    try:
        os.setxattr(fd, ORIGINS_XATTR, b" ".join([*current, tag]))
    except OSError:
        return False
    return True


def hash_fd(fd: int, algo: str, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    """The running hash of the first ``limit`` bytes of the file ``fd`` (all if None), and how many bytes that
    was (read with ``pread``: the file offset is neither used nor moved)."""
    hasher = hashlib.new(algo)
    done = 0
    while limit is None or done < limit:
        chunk = os.pread(fd, CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - done), done)
        if not chunk:
            break
        hasher.update(chunk)
        done += len(chunk)
    return hasher, done


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def reopen(fd: int) -> int:
    """A new read-only open file description of the file ``fd`` is open on (not sharing its lock or offset)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no /proc: the duplicate shares the lock, released when the last reader closes it
        return os.dup(fd)


def same_file(dir_fd: int, name: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def unlink_if_same(dir_fd: int, name: str, st: os.stat_result) -> None:
    """Remove ``name`` if it is still the file ``st`` describes (not whatever replaced it meanwhile)."""
    if same_file(dir_fd, name, st):
        os.unlink(name, dir_fd=dir_fd)


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each private (0700); an existing one keeps its mode."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, DIR_MODE)


class Busy(Exception):
    """Another download holds the partial's lock and no anonymous file can be made here: stream uncached."""
