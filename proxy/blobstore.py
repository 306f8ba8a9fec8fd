"""A verified, crash-safe local blob cache: ``DIR/blobs/<algo>/<hex>``.

- A download writes ``<hex>.partial`` beside the final name. Only when size and digest both match is the file
  fsynced, renamed into place and the directory fsynced: nothing unverified is ever under a digest name.
- A partial survives failures and restarts: the next download of that digest (this process or another)
  re-hashes the partial prefix and asks the registry for the rest with a Range request. If the finished file
  does not match its digest, the partial is removed (with a log line) and the next request starts from zero.
- One download per digest at a time (single flight): every reader of a digest being downloaded follows the
  growing partial file, so concurrent GetBlobs share one upstream transfer. Another process downloading the
  same digest holds an exclusive lock on the partial; then this one streams without caching.
- A lookup checks the size, and the digest unless the file carries our verification stamp (an xattr holding
  size and mtime at verification): a blob planted or changed behind our back is re-hashed before it is served.
- ``max_bytes``: after each new blob, the least recently used blobs are evicted until the cache fits; a blob
  being read is never evicted.
- Digests are validated before they name a path; nothing outside DIR is created, read or removed. A
  read-only DIR serves what it has and never writes (said once in the log).
"""

from __future__ import annotations

import collections
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

from protocol.errors import ErrorCode, ProtocolViolation, ProxyError
from protocol.methods import parse_digest
from proxy.cache_dir import PARTIAL_SUFFIX, CacheDir, Changed
from proxy.pipes import CHUNK_SIZE, splice_file
from proxy.sources.base import Blob

log = logging.getLogger(__name__)

STAMP_XATTR = "user.image-proxy.verified"


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


def hash_fd(fd: int, algo: str, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    """The running hash of the next ``limit`` bytes of ``fd`` (all if None), and how many bytes that was."""
    hasher = hashlib.new(algo)
    done = 0
    while limit is None or done < limit:
        chunk = os.read(fd, CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - done))
        if not chunk:
            break
        hasher.update(chunk)
        done += len(chunk)
    return hasher, done


def hash_file(path: Path, algo: str, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    """:func:`hash_fd` of a file's first ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, algo, limit)
    finally:
        os.close(fd)


class Download:
    """One upstream transfer of a digest into its partial file, followed by any number of readers."""

    def __init__(self, store: BlobStore, digest: str, expected_size: int | None) -> None:
        """Opens and locks the partial file; raises Busy when another process holds it."""
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.partial = store.partial_path(digest)
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise Busy() from None
        self.written = 0  # bytes in the partial file that readers may read
        self.done = False
        self.error: ProxyError | None = None
        self.readers = 0
        self._changed = trio.Event()
        self.cancel_scope = trio.CancelScope()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_more(self, have: int) -> None:
        while not self.done and self.written <= have:
            await self._changed.wait()

    async def run(self, open_from: Callable[[int], Awaitable[Blob]]) -> None:
        """Fill the partial file (resuming it), verify, and move it into place."""
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
            self.store._downloads.pop(self.digest, None)
            self._notify()

    async def _run(self, open_from: Callable[[int], Awaitable[Blob]]) -> None:
        algo, _, hexpart = self.digest.partition(":")
        fd = self.fd
        try:
            start = os.fstat(fd).st_size
            if self.expected_size is not None and start >= self.expected_size:
                # Complete already (killed between the last write and the rename): no Range request, which
                # would get a 416; keep it if it is the blob, else start again.
                hasher, size = await trio.to_thread.run_sync(hash_file, self.partial, algo)
                if hasher.hexdigest() == hexpart:
                    self.written = size
                    await trio.to_thread.run_sync(self._commit, fd)
                    self.done = True
                    return
                self._discard_partial(fd, "is complete but does not match its digest", unlink=False)
                start = 0
            hasher, prefix = await trio.to_thread.run_sync(hash_file, self.partial, algo, start)
            if prefix:
                log.info("blob cache: %s: resuming from the %d bytes of %s", self.digest, prefix, self.partial.name)
            self.written = prefix
            self._notify()
            blob = await open_from(prefix)
            async with blob:
                while chunk := await blob.read(CHUNK_SIZE):
                    await trio.to_thread.run_sync(os.pwrite, fd, chunk, self.written)
                    hasher.update(chunk)
                    self.written += len(chunk)
                    self._notify()
            if self.expected_size is not None and self.written != self.expected_size:
                raise StoreError(f"expected {self.expected_size} bytes in blob, got {self.written}")
            if hasher.hexdigest() != hexpart:
                self._discard_partial(fd, "does not match its digest")
                raise StoreError(f"corrupted blob, expecting {self.digest}")
            await trio.to_thread.run_sync(self._commit, fd)
            self.done = True
        finally:
            os.close(fd)

    def _discard_partial(self, fd: int, why: str, *, unlink: bool = True) -> None:
        """Drop the partial's content (and its name, when the download ends here)."""
        log.warning("blob cache: %s %s; dropping it, the blob is fetched again", self.partial, why)
        os.ftruncate(fd, 0)
        if unlink:
            self.partial.unlink(missing_ok=True)
        self.written = 0

    def _commit(self, fd: int) -> None:
        os.fsync(fd)
        final = self.store.final_path(self.digest)
        os.rename(self.partial, final)
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.store._set_stamp(final)
        log.debug("blob cache: stored %s (%d bytes)", self.digest, self.written)


class Busy(Exception):
    """Another process holds the partial file's lock (it is downloading that digest)."""


class FollowingBlob(Blob):
    """A reader of a download in progress: reads the partial file as it grows, then the finished file.

    It ends (``b""``) only once the download verified size and digest, and raises the download's error
    otherwise, so it ``verifies_digest``."""

    verifies_digest = True

    def __init__(self, download: Download, fd: int) -> None:
        self._download = download
        self._fd: int | None = fd
        self._pos = 0
        self.size = download.expected_size if download.expected_size is not None else -1
        download.readers += 1
        download.store._reading[download.digest] += 1

    async def read(self, max_bytes: int) -> bytes:
        download = self._download
        while True:
            if self._pos < download.written:
                n = min(max_bytes, download.written - self._pos)
                data = await trio.to_thread.run_sync(os.pread, self._fd, n, self._pos)
                self._pos += len(data)
                return data
            if download.done:
                if download.error is not None:
                    raise download.error
                return b""
            await download.wait_for_more(self._pos)

    async def splice_into(self, writer: trio.lowlevel.FdStream) -> int:
        """All of the blob into a pipe by sendfile, as the download writes it; the bytes sent."""
        download = self._download
        while True:
            if self._pos < download.written:
                reached = await splice_file(self._fd, download.written, writer, start=self._pos)
                if reached == self._pos:
                    raise StoreError(f"blob cache: {download.partial} is shorter than what was written to it")
                self._pos = reached
                continue
            if download.done:
                if download.error is not None:
                    raise download.error
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


class FileBlob(Blob):
    """A cached blob, read from disk (the pipe producers can also splice it: see ``path``)."""

    def __init__(self, store: BlobStore, digest: str, path: Path, fd: int, size: int) -> None:
        self._store = store
        self.digest = digest
        self.path = path
        self._fd: int | None = fd
        self._pos = 0
        self.size = size
        store._reading[digest] += 1

    @property
    def spliceable_fd(self) -> int | None:
        """The open file, for producers that copy it in the kernel (it was verified at lookup)."""
        return self._fd

    async def read(self, max_bytes: int) -> bytes:
        data = await trio.to_thread.run_sync(os.pread, self._fd, max_bytes, self._pos)
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
        self._downloads: dict[str, Download] = {}
        self._reading: collections.Counter[str] = collections.Counter()
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.read_only = not os.access(self.blobs, os.W_OK)
        except OSError as e:
            if not self.blobs.is_dir():
                raise StoreError(f"blob cache {self.root}: cannot create it: {e.strerror}") from None
            self.read_only = True
        if self.read_only:
            log.warning("blob cache %s is read-only: serving what it holds, storing nothing", self.root)

    # ------------------------------------------------------------------ paths

    def final_path(self, digest: str) -> Path:
        try:
            parse_digest(digest)
        except ProtocolViolation as e:
            raise StoreError(f"blob cache: {e.message}") from None
        algo, _, hexpart = digest.partition(":")
        return self.blobs / algo / hexpart

    def partial_path(self, digest: str) -> Path:
        """The partial file's path; its directory is created (the store is writable when this is asked)."""
        final = self.final_path(digest)
        final.parent.mkdir(exist_ok=True)
        return final.with_name(final.name + PARTIAL_SUFFIX)

    # ------------------------------------------------------------------ lookups

    def _set_stamp(self, path: Path) -> None:
        write_stamp(path, path.stat())

    def _stamp_ok(self, path: Path, st: os.stat_result) -> bool:
        try:
            return os.getxattr(path, STAMP_XATTR) == verification_stamp(st)
        except OSError:
            return False

    def _lookup_sync(self, digest: str, expected_size: int | None) -> Path | None:
        path = self.final_path(digest)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        problem = None
        if not stat.S_ISREG(st.st_mode):
            log.error("blob cache: %s is not a regular file; not served, not removed", path)
            return None
        if expected_size is not None and st.st_size != expected_size:
            problem = f"is {st.st_size} bytes, expected {expected_size}"
        elif not self._stamp_ok(path, st):
            algo, _, hexpart = digest.partition(":")
            hasher, _ = hash_file(path, algo)
            if hasher.hexdigest() != hexpart:
                problem = "does not match its digest"
            elif not self.read_only:
                self._set_stamp(path)
        if problem is None:
            return path
        if self.read_only:
            log.error("blob cache: %s %s (read-only cache: not removed, not served)", path, problem)
        else:
            log.warning("blob cache: %s %s; removing it, the blob is fetched again", path, problem)
            path.unlink(missing_ok=True)
        return None

    async def open_cached(self, digest: str, expected_size: int | None) -> FileBlob | None:
        """The verified cached blob, or None (a bad file is removed, with a log line)."""
        path = await trio.to_thread.run_sync(self._lookup_sync, digest, expected_size)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # evicted (or replaced by something else) between lookup and open
            return None
        st = os.fstat(fd)
        if not self.read_only:
            # least recently used = oldest atime; set it ourselves (relatime mounts update it rarely), keep mtime
            os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
        return FileBlob(self, digest, path, fd, st.st_size)

    # ------------------------------------------------------------------ downloads

    async def fetch(
        self,
        digest: str,
        expected_size: int | None,
        open_from: Callable[[int], Awaitable[Blob]],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> Blob:
        """A reader of the blob: from the cache, or following its (shared) download into the cache."""
        for _ in range(3):
            cached = await self.open_cached(digest, expected_size)
            if cached is not None:
                return cached
            if self.read_only:
                return await open_from(0)
            download = self._downloads.get(digest)
            if download is None:
                try:
                    download = Download(self, digest, expected_size)
                except Busy:
                    log.info("blob cache: %s is being downloaded by another process; streaming it uncached", digest)
                    return await open_from(0)
                self._downloads[digest] = download
                spawn(functools.partial(self._run_download, download, open_from))
            try:
                fd = os.open(download.partial, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # the download is just moving its file into place (or dropping it): look again once it is over
                await download.wait_for_more(download.expected_size or 1 << 62)
                continue
            return FollowingBlob(download, fd)
        raise StoreError(f"blob cache: {digest} keeps disappearing while being stored", ErrorCode.RETRYABLE)

    async def _run_download(self, download: Download, open_from: Callable[[int], Awaitable[Blob]]) -> None:
        await download.run(open_from)
        if download.error is None:
            await trio.to_thread.run_sync(self.evict)

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
        with CacheDir(self.root) as cache:
            entries = [e for e in cache.scan() if e.kind in ("blob", "partial")]
            total = sum(e.size for e in entries)
            for entry in sorted((e for e in entries if e.kind == "blob"), key=lambda e: e.atime_ns):
                if total <= self.max_bytes:
                    break
                digest = f"{entry.algo}:{entry.name}"
                if digest in self._reading or digest in self._downloads:
                    continue
                log.info(
                    "blob cache: evicting %s (%d bytes) to stay under %d bytes", digest, entry.size, self.max_bytes
                )
                try:
                    cache.remove(entry, same_atime=True)
                except Changed:
                    continue  # read (or replaced) since the scan: not the least recently used any more
                total -= entry.size
