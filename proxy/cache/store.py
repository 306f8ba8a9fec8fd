"""A verified, crash-safe local blob cache: ``DIR/blobs/<algo>/<hex>``, shared by every client of a daemon.

Storing:

- A download writes ``<hex>.partial`` beside the final name, holding an exclusive lock on it. Only when its digest
  matches is the file fsynced, moved to the final name and the directory fsynced: nothing unverified is ever under
  a digest name.
- A partial survives failures and restarts: the next download of that digest from the same source (this process
  or another) re-hashes the partial and asks the registry for the rest with a Range request. The partial records
  its source (xattr ``user.image-proxy.source``, a hash of it); a download from another source starts it again.
- Bytes resumed from disk are not trusted before the whole blob is verified: readers get them only then. If the
  finished file does not match its digest, the partial is dropped (with a log line) and the download starts again
  from zero in the same request, once, so its readers still get the blob. A download from zero that does not match
  fails its readers (``corrupted blob``): its source sent wrong bytes.

Sharing (single flight) is keyed by digest **and source** — the registry the client's reference names (its
mirrors and rewrites are the administrator's registries.conf, the same for every client naming it). Every reader
of a digest being downloaded from the same source follows the growing file, so concurrent GetBlobs of one image
share one upstream transfer; a reader never waits on, or fails with, a registry it did not name.
Why keyed by source, not a follower that switches when the shared download is slower or fails: "slower" needs a
judgement (a registry that is merely slower is not hostile, and switching early doubles the traffic), and a
follower that switches mid-stream sends bytes of two transfers as one stream, which the single digest check at the
end must then cover for each reader. Keyed by source, each transfer is one stream from one registry, verified as a
whole. The cost: two clients pulling one blob from two registries at the same moment download it twice (only while
both are in flight; afterwards the cache serves both). A reader that did not start the download it follows gets the
store's own errors, and for a failure of the source a retryable error that names neither the other client's image
nor its error (a retry downloads the blob on its own behalf).

Two downloads of one digest from two sources at once never write one file: the second finds the partial locked
and writes an anonymous file in the same directory (``O_TMPFILE``; where that is not available it streams the blob
uncached). Whichever verifies first puts its file under the final name; the other keeps that verified file (it is
identical) and drops its own, its readers reading on from the file they have open. Another process downloading
the same digest is handled the same way.

Serving:

- A lookup opens the final name without following symlinks and checks the open file: its digest, unless it
  carries our verification stamp (an xattr holding size and mtime at verification) **and** the stamp can be
  believed — the file is ours (owned by this process's uid), not group- or other-writable and not hard-linked.
  Anything else is re-hashed before it is served; a wrong file is removed and fetched again, never served.
- A client's size that disagrees with a verified blob is that client's error (``expected N bytes in blob, got M``
  from FinishPipe): the blob is served as it is and never removed for it.
- ``max_bytes``: after each new blob, the least recently used blobs are evicted until the cache fits; a blob being
  read or downloaded is never evicted.

Defending itself: DIR is opened once; every path under it is opened relative to DIR's descriptor without following
a symlink, component by component (``blobs``, ``blobs/<algo>``, then the file). A symlinked ``blobs``,
``blobs/<algo>``, partial or blob, a hard-linked partial, anything that is not a directory or a regular file where
one is expected, is refused with a log line naming it: never followed, never written through, never removed; that
blob is streamed uncached (``image-proxy cache verify`` reports it as ``unsafe``). What the store creates is
private (directories 0700, files 0600); an existing DIR keeps its mode (systemd's ``CacheDirectoryMode=``). Digests
are validated before they name a path. A read-only DIR serves what it has and never writes (said once in the log).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from protocol.digests import parse_digest
from protocol.errors import ErrorCode, ProtocolViolation, ProxyError
from proxy.cache.directory import (
    DIR_MODE,
    FILE_MODE,
    PARTIAL_SUFFIX,
    CacheDir,
    Changed,
    Refused,
    is_writable,
    open_regular,
    open_subdir,
)
from proxy.common import threads
from proxy.common.pipes import CHUNK_SIZE, splice_file
from proxy.sources.base import Blob, FileWindow

log = logging.getLogger(__name__)

STAMP_XATTR = "user.image-proxy.verified"
#: on a partial: a hash of the source its bytes came from (see source_tag)
SOURCE_XATTR = "user.image-proxy.source"
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


def stamp_can_be_believed(st: os.stat_result) -> bool:
    """Whether a stamp on a file like this proves anything: nobody but this process's user can have written the
    file (or its stamp) after we verified it. Otherwise the stamp is a claim, and the file is re-hashed."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
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
    """What a partial records of the source its bytes came from (``SOURCE_XATTR``)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16].encode()


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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _reopen(fd: int) -> int:
    """A new read-only open file description of the file ``fd`` is open on (not sharing its lock or offset)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no /proc: the duplicate shares the lock, released when the last reader closes it
        return os.dup(fd)


def _same_file(dir_fd: int, name: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _unlink_if_same(dir_fd: int, name: str, st: os.stat_result) -> None:
    """Remove ``name`` if it is still the file ``st`` describes (not whatever replaced it meanwhile)."""
    if _same_file(dir_fd, name, st):
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


class Download:
    """One upstream transfer of a digest from one source into a file, followed by any number of readers."""

    def __init__(self, store: BlobStore, digest: str, source: str, expected_size: int | None) -> None:
        """Opens and locks the partial file (or, when another download holds it, an anonymous file). Raises
        Refused, Busy or OSError."""
        self.store = store
        self.digest = digest
        self.source = source
        self.key = (digest, source)
        #: the first asker's size: only a hint (a complete partial is committed without the network)
        self.expected_size = expected_size
        #: the size a verified manifest gives the blob, if known: a source that sends more is cut off there, so
        #: an endless body cannot fill the cache's disk
        self.size_limit: int | None = None
        algo, _, self.hexpart = digest.partition(":")
        self.algo = algo
        self.dir_fd = store._algo_dir(algo, create=True)
        self.directory = store.blobs / algo
        try:
            self.fd, self.named = self._claim()
        except BaseException:
            os.close(self.dir_fd)
            raise
        self.partial = self.directory / (self.hexpart + PARTIAL_SUFFIX)
        self.path = self.partial if self.named else self.directory / f"(an anonymous file for {self.hexpart})"
        self.written = 0  # bytes in the file
        self.readable = 0  # bytes readers may read: the live transfer's, or all of them once verified
        self.epoch = 0  # how many times the file was dropped: a reader past byte 0 of an earlier one must fail
        self.done = False
        self.error: ProxyError | None = None
        self.readers = 0
        self._changed = trio.Event()
        self.cancel_scope = trio.CancelScope()

    def _claim(self) -> tuple[int, bool]:
        name = self.hexpart + PARTIAL_SUFFIX
        path = self.directory / name
        fd = open_regular(self.dir_fd, name, path, os.O_RDWR | os.O_CREAT)
        try:
            st = os.fstat(fd)
            if st.st_nlink != 1:
                raise Refused(path, f"has {st.st_nlink} hard links (a partial is never written through another name)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = -1
                return self._anonymous(), False
            mine = source_tag(self.source)
            try:
                theirs: bytes | None = os.getxattr(fd, SOURCE_XATTR)
            except OSError:
                theirs = None
            if st.st_size and theirs is not None and theirs != mine:
                log.info(
                    "blob cache: %s holds %d bytes from another source; starting it again from %s",
                    path,
                    st.st_size,
                    self.source or "this source",
                )
                os.ftruncate(fd, 0)
            if theirs != mine:
                # without xattrs an untagged partial is resumed by anyone (and verified before use)
                with contextlib.suppress(OSError):
                    os.setxattr(fd, SOURCE_XATTR, mine)
            return fd, True
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _anonymous(self) -> int:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, FILE_MODE, dir_fd=self.dir_fd)
        except OSError:
            raise Busy() from None
        log.debug(
            "blob cache: %s is being downloaded by another download; this one writes an anonymous file", self.digest
        )
        return fd

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_more(self, have: int) -> None:
        while not self.done and self.readable <= have:
            await self._changed.wait()

    async def run(self, open_from: Callable[[int], Awaitable[Blob]]) -> None:
        """Fill the file (resuming a partial), verify, and move it into place."""
        try:
            with self.cancel_scope:
                await self._run(open_from)
        except ProxyError as e:
            self.error = e
        except Exception as e:
            log.exception("cache download of %s failed", self.digest)
            self.error = StoreError(f"blob cache: downloading {self.digest}: {type(e).__name__}: {e}")
        finally:
            if not self.done and self.error is None:
                self.error = StoreError(f"blob cache: download of {self.digest} was cancelled", ErrorCode.RETRYABLE)
            self.done = True
            os.close(self.fd)  # readers have files of their own
            os.close(self.dir_fd)
            if self.store._downloads.get(self.key) is self:
                del self.store._downloads[self.key]
            self._notify()

    async def _run(self, open_from: Callable[[int], Awaitable[Blob]]) -> None:
        start = os.fstat(self.fd).st_size
        if start and self.expected_size is not None and start >= self.expected_size:
            # Complete already (killed between the last write and the rename): no Range request, which would
            # get a 416; keep it if it is the blob, else start again.
            hasher, size = await threads.run_sync(hash_fd, self.fd, self.algo)
            if hasher.hexdigest() == self.hexpart:
                self.written = size
                await self._commit()
                return
            self._drop("is complete but does not match its digest")
            start = 0
        hasher, prefix = await threads.run_sync(hash_fd, self.fd, self.algo, start)
        self.written = prefix
        if prefix:
            log.info(
                "blob cache: %s: resuming from the %d bytes of %s (served once the whole blob is verified)",
                self.digest,
                prefix,
                self.path.name,
            )
        if await self._transfer(open_from, hasher, live=not prefix):
            await self._commit()
            return
        if prefix:
            # nothing was served yet: start again from zero for the same readers
            self._drop("(resumed) does not match its digest")
            if await self._transfer(open_from, hashlib.new(self.algo), live=True):
                await self._commit()
                return
        self._drop("does not match its digest", unlink=True)
        raise StoreError(f"corrupted blob, expecting {self.digest}")

    async def _transfer(
        self, open_from: Callable[[int], Awaitable[Blob]], hasher: hashlib._Hash, *, live: bool
    ) -> bool:
        """Append the source's bytes from ``written`` on; whether the file then matches the digest. A live
        transfer (from zero) is readable as it comes; resumed bytes only once verified."""
        blob = await open_from(self.written)
        async with blob:
            while chunk := await blob.read(CHUNK_SIZE):
                if self.size_limit is not None and self.written + len(chunk) > self.size_limit:
                    self._drop(f"grows past the {self.size_limit} bytes its manifest gives", unlink=True)
                    raise StoreError(
                        f"blob cache: {self.source or 'the source'} sent more than the {self.size_limit} bytes the "
                        f"manifest gives {self.digest}"
                    )
                await threads.run_sync(_pwrite_all, self.fd, chunk, self.written)
                hasher.update(chunk)
                self.written += len(chunk)
                if live:
                    self.readable = self.written
                    self._notify()
        return hasher.hexdigest() == self.hexpart

    def _drop(self, why: str, *, unlink: bool = False) -> None:
        """Drop the file's content (and the partial's name, when the download ends here)."""
        again = "" if unlink else "; the blob is fetched again from zero"
        log.warning("blob cache: %s %s; dropping it%s", self.path, why, again)
        os.ftruncate(self.fd, 0)
        self.written = self.readable = 0
        self.epoch += 1
        if unlink and self.named:
            _unlink_if_same(self.dir_fd, self.partial.name, os.fstat(self.fd))

    async def _commit(self) -> None:
        try:
            await threads.run_sync(self._install)
        except (OSError, StoreError) as e:
            # the bytes are verified and every reader has them open: they are served, only not kept
            log.warning("blob cache: %s is verified but could not be stored: %s", self.digest, e)
        self.readable = self.written
        self.done = True

    def _install(self) -> None:
        """The verified file under the final name (unless a verified one is there already); the directory
        fsynced; the file stamped."""
        os.fsync(self.fd)
        st = os.fstat(self.fd)
        final = self.hexpart
        if self.store._holds_verified(self.dir_fd, final, st.st_size):
            # another download (another source, another process) finished first: its file is identical
            log.debug("blob cache: %s was stored meanwhile; dropping %s", self.digest, self.path)
            if self.named:
                _unlink_if_same(self.dir_fd, self.partial.name, st)
            return
        if self.named and _same_file(self.dir_fd, self.partial.name, st):
            os.rename(self.partial.name, final, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            self._link(final)
        os.fsync(self.dir_fd)
        with contextlib.suppress(OSError):
            os.removexattr(self.fd, SOURCE_XATTR)  # a blob is a blob, wherever it came from
        write_stamp(self.fd, os.fstat(self.fd))
        log.debug("blob cache: stored %s (%d bytes)", self.digest, self.written)

    def _link(self, final: str) -> None:
        """Give the (anonymous) file the final name, replacing a file there that is not a verified blob."""
        for _ in range(2):
            try:
                os.link(f"/proc/self/fd/{self.fd}", final, dst_dir_fd=self.dir_fd, follow_symlinks=True)
                return
            except FileExistsError:
                try:
                    st = os.stat(final, dir_fd=self.dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    break
                _unlink_if_same(self.dir_fd, final, st)
        raise StoreError(f"blob cache: cannot store {self.digest} under {self.directory / final}")


class FollowingBlob(Blob):
    """A reader of a download in progress: reads the file as it grows (or once verified, for resumed bytes).

    It ends (``b""``) only once the download verified the digest, and raises the download's error otherwise, so
    it ``verifies_digest``. ``size`` is the size its asker expects (checked by the producer at the end)."""

    verifies_digest = True

    def __init__(self, download: Download, expected_size: int | None, starter: bool) -> None:
        self._download = download
        self._fd: int | None = _reopen(download.fd)
        self._pos = 0
        self._epoch = download.epoch
        self._starter = starter
        self.size = expected_size if expected_size is not None else -1
        download.readers += 1
        download.store._reading[download.digest] += 1

    def _failure(self) -> ProxyError:
        download = self._download
        error = download.error
        assert error is not None
        if self._starter or isinstance(error, StoreError):
            return error
        # the source failed for the client that started the download: its error names that client's image
        return StoreError(
            f"blob cache: the download of {download.digest} from {download.source or 'its registry'}, shared with "
            "another pull, failed; try again",
            ErrorCode.RETRYABLE,
        )

    def _check_epoch(self) -> None:
        """The bytes this reader gave out came from the download's current file (never true of a reader that
        got bytes of a dropped one: resumed bytes are given out only once verified, so this does not happen)."""
        download = self._download
        if download.epoch != self._epoch:
            if self._pos:
                raise StoreError(f"corrupted blob, expecting {download.digest}")
            self._epoch = download.epoch

    def _check_not_short(self) -> None:
        """After a read that got nothing: fine if the download dropped its file meanwhile (``readable`` went
        back), an error if the file is shorter than what the download says it wrote."""
        if self._pos < self._download.readable:
            raise StoreError(f"blob cache: {self._download.path} is shorter than what was written to it")

    async def read(self, max_bytes: int) -> bytes:
        download = self._download
        while True:
            self._check_epoch()
            if self._pos < download.readable:
                n = min(max_bytes, download.readable - self._pos)
                data = await threads.run_sync(os.pread, self._fd, n, self._pos)
                if data:
                    self._pos += len(data)
                    return data
                # never an end: the download dropped the file meanwhile (then it says so), or the file is short
                self._check_not_short()
                continue
            if download.done:
                if download.error is not None:
                    raise self._failure()
                return b""
            await download.wait_for_more(self._pos)

    async def send_to(self, writer: trio.lowlevel.FdStream) -> int:
        """All of the blob into a pipe by sendfile, as it becomes readable; the bytes sent."""
        download = self._download
        assert self._fd is not None
        while True:
            self._check_epoch()
            if self._pos < download.readable:
                reached = await splice_file(self._fd, download.readable, writer, start=self._pos)
                if reached == self._pos:
                    self._check_not_short()
                self._pos = reached
                continue
            if download.done:
                if download.error is not None:
                    raise self._failure()
                return self._pos
            await download.wait_for_more(self._pos)

    async def aclose(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        download = self._download
        download.readers -= 1
        download.store._release(download.digest)
        if download.readers == 0 and not download.done:
            # nobody wants it any more: stop the transfer; the partial stays for the next pull
            download.cancel_scope.cancel()


class CachedBlob(Blob):
    """A cached blob, verified when it was opened, read from that open file (producers splice it)."""

    def __init__(self, store: BlobStore, digest: str, path: Path, fd: int, size: int) -> None:
        self._store = store
        self.digest = digest
        self.path = path
        self._fd: int | None = fd
        self._pos = 0
        self.size = size
        store._reading[digest] += 1

    verifies_digest = True  # checked when it was opened (see BlobStore.open_cached)

    def window(self) -> FileWindow:
        """The unread bytes of the open, verified file: producers send it with sendfile, ranges are pread."""
        if self._fd is None:
            raise ValueError("blob is closed")
        return FileWindow(self._fd, self._pos, self.size - self._pos)

    async def read(self, max_bytes: int) -> bytes:
        data = await threads.run_sync(os.pread, self._fd, max_bytes, self._pos)
        self._pos += len(data)
        return data

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._store._release(self.digest)


class BlobStore:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(root).absolute()
        self.blobs = self.root / "blobs"
        self.max_bytes = max_bytes
        self._downloads: dict[tuple[str, str], Download] = {}
        self._reading: collections.Counter[str] = collections.Counter()
        self._refusals_logged: set[str] = set()
        try:
            make_private_dirs(self.root)
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"blob cache {self.root}: cannot create it: {e.strerror}") from None
        self.read_only = False
        try:
            blobs_fd = open_subdir(self._root_fd, "blobs", self.blobs, create=True)
        except Refused as e:
            self._refused(e)  # every blob is streamed uncached until it is put right
        except OSError as e:
            try:
                blobs_fd = open_subdir(self._root_fd, "blobs", self.blobs, create=False)
            except OSError:
                os.close(self._root_fd)
                raise StoreError(f"blob cache {self.root}: cannot create it: {e.strerror}") from None
            self.read_only = True
            os.close(blobs_fd)
        else:
            self.read_only = not is_writable(self.blobs, blobs_fd)
            os.close(blobs_fd)
        if self.read_only:
            log.warning("blob cache %s is read-only: serving what it holds, storing nothing", self.root)

    def close(self) -> None:
        """Close DIR (for tests and embedders; a process simply ends)."""
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # ------------------------------------------------------------------ paths

    def _split(self, digest: str) -> tuple[str, str]:
        try:
            parse_digest(digest)
        except ProtocolViolation as e:
            raise StoreError(f"blob cache: {e.message}") from None
        algo, _, hexpart = digest.partition(":")
        return algo, hexpart

    def final_path(self, digest: str) -> Path:
        algo, hexpart = self._split(digest)
        return self.blobs / algo / hexpart

    def partial_path(self, digest: str) -> Path:
        final = self.final_path(digest)
        return final.with_name(final.name + PARTIAL_SUFFIX)

    def _algo_dir(self, algo: str, *, create: bool) -> int:
        """``blobs/<algo>`` opened from DIR's descriptor, component by component, following no symlink. Raises
        Refused, FileNotFoundError (without ``create``) or OSError."""
        blobs_fd = open_subdir(self._root_fd, "blobs", self.blobs, create=create)
        try:
            return open_subdir(blobs_fd, algo, self.blobs / algo, create=create)
        finally:
            os.close(blobs_fd)

    def _refused(self, refusal: Refused) -> None:
        key = str(refusal)
        if key in self._refusals_logged:
            log.debug("blob cache: refusing %s", refusal)
            return
        if len(self._refusals_logged) < MAX_REFUSALS_LOGGED:
            self._refusals_logged.add(key)
        log.error(
            "blob cache: refusing %s; it is not followed, written or removed, and what it would hold is "
            "streamed uncached (image-proxy cache verify reports it)",
            refusal,
        )

    # ------------------------------------------------------------------ lookups

    def _holds_verified(self, dir_fd: int, name: str, size: int) -> bool:
        """Whether ``name`` is a regular file of ``size`` bytes with a stamp that can be believed."""
        try:
            fd = open_regular(dir_fd, name, Path(name))
        except (OSError, Refused):
            return False
        try:
            st = os.fstat(fd)
            return st.st_size == size and has_valid_stamp(fd, st)
        finally:
            os.close(fd)

    def _lookup_sync(self, digest: str) -> tuple[int, os.stat_result] | None:
        """The verified cached blob, open (its fd and stat), or None; a wrong file is removed (with a log line).
        Raises Refused when the name (or a directory above it) is not what the cache puts there."""
        algo, hexpart = self._split(digest)
        path = self.blobs / algo / hexpart
        try:
            dir_fd = self._algo_dir(algo, create=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Refused(path.parent, f"cannot be opened: {e.strerror}") from None
        try:
            try:
                fd = open_regular(dir_fd, hexpart, path)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise Refused(path, f"cannot be read: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                if has_valid_stamp(fd, st):
                    return fd, st
                hasher, _ = hash_fd(fd, algo)
                if hasher.hexdigest() == hexpart:
                    after = os.fstat(fd)
                    unchanged = (st.st_size, st.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
                    if not self.read_only and unchanged and stamp_can_be_believed(after):
                        write_stamp(fd, after)
                    return fd, after
                if self.read_only:
                    log.error(
                        "blob cache: %s does not match its digest (read-only cache: not removed, not served)", path
                    )
                else:
                    log.warning(
                        "blob cache: %s does not match its digest; removing it, the blob is fetched again", path
                    )
                    _unlink_if_same(dir_fd, hexpart, st)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            return None
        finally:
            os.close(dir_fd)

    def _file_blob(self, digest: str, fd: int, st: os.stat_result) -> CachedBlob:
        if not self.read_only:
            # least recently used = oldest atime; set it ourselves (relatime mounts update it rarely), keep mtime
            with contextlib.suppress(PermissionError):  # not our file: it keeps its atime
                os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
        return CachedBlob(self, digest, self.final_path(digest), fd, st.st_size)

    async def open_cached(self, digest: str, expected_size: int | None = None) -> CachedBlob | None:
        """The verified cached blob, or None (a wrong file is removed, a refused path logged).

        ``expected_size`` is not checked here: a verified blob is what it is, and a size that disagrees is the
        asker's error, reported by the producer (``expected N bytes in blob, got M``)."""
        try:
            found = await threads.run_sync(self._lookup_sync, digest)
        except Refused as e:
            self._refused(e)
            return None
        return None if found is None else self._file_blob(digest, *found)

    # ------------------------------------------------------------------ downloads

    async def fetch(
        self,
        digest: str,
        expected_size: int | None,
        open_from: Callable[[int], Awaitable[Blob]],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        *,
        source: str = "",
        size_limit: int | None = None,
    ) -> Blob:
        """A reader of the blob: from the cache, or following its download from ``source`` (shared with every
        reader asking for that digest from that source) into the cache. ``open_from(offset)`` opens the blob at
        the source; ``spawn`` starts the download where it outlives this request."""
        try:
            found = await threads.run_sync(self._lookup_sync, digest)
        except Refused as e:
            self._refused(e)
            return await open_from(0)
        if found is not None:
            return self._file_blob(digest, *found)
        if self.read_only:
            return await open_from(0)
        download = self._downloads.get((digest, source))
        starter = download is None
        if download is None:
            try:
                download = Download(self, digest, source, expected_size)
                download.size_limit = size_limit
            except Refused as e:
                self._refused(e)
                return await open_from(0)
            except Busy:
                log.info("blob cache: another download holds the partial of %s; streaming it uncached", digest)
                return await open_from(0)
            except OSError as e:
                log.warning("blob cache: cannot store %s (%s); streaming it uncached", digest, e.strerror or e)
                return await open_from(0)
            self._downloads[download.key] = download
            spawn(functools.partial(self._run_download, download, open_from))
        return FollowingBlob(download, expected_size, starter)

    async def _run_download(self, download: Download, open_from: Callable[[int], Awaitable[Blob]]) -> None:
        await download.run(open_from)
        if download.error is None:
            await threads.run_sync(self.evict)

    # ------------------------------------------------------------------ size limit

    def _release(self, digest: str) -> None:
        self._reading[digest] -= 1
        if self._reading[digest] <= 0:
            del self._reading[digest]

    def evict(self) -> None:
        """Remove least recently used blobs until the cache fits ``max_bytes`` (never one being read or
        downloaded). The directory is walked without following symlinks: nothing outside it is touched."""
        if self.max_bytes is None:
            return
        downloading = {digest for digest, _ in self._downloads.copy()}  # (this runs in a worker thread)
        with CacheDir(self.root) as cache:
            entries = [e for e in cache.scan() if e.kind in ("blob", "partial")]
            total = sum(e.size for e in entries)
            for entry in sorted((e for e in entries if e.kind == "blob"), key=lambda e: e.atime_ns):
                if total <= self.max_bytes:
                    break
                digest = f"{entry.algo}:{entry.name}"
                if digest in self._reading or digest in downloading:
                    continue
                log.info(
                    "blob cache: evicting %s (%d bytes) to stay under %d bytes", digest, entry.size, self.max_bytes
                )
                try:
                    cache.remove(entry, same_atime=True)
                except Changed:
                    continue  # read (or replaced) since the scan: not the least recently used any more
                total -= entry.size
