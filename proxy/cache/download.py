"""One upstream transfer of a digest from one source into a cache file, and the readers that follow it as it grows
(see ``proxy.cache.store`` for the rules: single flight per digest and source, resumed bytes served only once
verified, a wrong partial dropped and fetched again in the same request)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.cache.directory import (
    FILE_MODE,
    PARTIAL_SUFFIX,
    Refused,
    open_regular,
)
from proxy.cache.files import (
    SOURCE_XATTR,
    Busy,
    StoreError,
    add_origin,
    hash_fd,
    origins_can_be_believed,
    pwrite_all,
    reopen,
    same_file,
    source_tag,
    unlink_if_same,
    write_stamp,
)
from proxy.cache.writeback import WriteBehind
from proxy.common import threads
from proxy.common.pipes import splice_file
from proxy.server.metrics import STATS, Fetch
from proxy.sources.base import Blob
from proxy.transfer.pump import pump

if TYPE_CHECKING:
    from proxy.cache.store import BlobStore

log = logging.getLogger("proxy.cache.store")


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
        #: the readers following this download, and the offset up to which every one of them has read (kept
        #: in the trio thread; the writer's thread only reads the number, to drop what was read from the cache)
        self.followers: set[FollowingBlob] = set()
        self.consumed = 0
        self._changed = trio.Event()
        self.cancel_scope = trio.CancelScope()
        #: how the bytes come over the network, once the source is opened (its hosts and resumes)
        self.fetch: Fetch | None = None

    def _claim(self) -> tuple[int, bool]:
        name = self.hexpart + PARTIAL_SUFFIX
        path = self.directory / name
        fd = open_regular(self.dir_fd, name, path, os.O_RDWR | os.O_CREAT)
        try:
            self._give_to_owner(fd)
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
                # never truncated for another source (whose client would start again from 0), never resumed from
                # this one (whose registry could "complete" bytes it does not have by guessing the last ones):
                # this download writes an anonymous file instead, as when the partial is locked
                log.info("blob cache: %s holds %d bytes from another source; not resuming it", path, st.st_size)
                os.close(fd)
                fd = -1
                return self._anonymous(), False
            if st.st_size and theirs is None:
                # nobody can say whose bytes these are (no xattrs here): started again, never resumed by anyone
                log.info("blob cache: %s holds %d bytes of an unknown source; starting it again", path, st.st_size)
                os.ftruncate(fd, 0)
            if theirs != mine:
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
        self._give_to_owner(fd)
        log.debug(
            "blob cache: %s is being downloaded by another download; this one writes an anonymous file", self.digest
        )
        return fd

    def _give_to_owner(self, fd: int) -> None:
        """A file root creates in another user's cache (a proxy spawned as root, in the daemon's) becomes that
        user's: the owner believes and resumes only its own files, and would otherwise download such a blob again
        each time."""
        owner = self.store.owner
        if owner != 0 and os.geteuid() == 0 and os.fstat(fd).st_uid == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, owner, -1)

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
            self.store.downloads_ended += 1  # a fetch that looked the blob up meanwhile looks again (store.fetch)
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
        self.fetch = blob.fetch
        position = self.written  # the next byte's offset in the file: the worker thread's
        queued = self.written  # the same, counted as chunks are accepted (in trio)
        write_behind = WriteBehind(self.fd, position, lambda: self.consumed)

        def accept(chunk: memoryview) -> None:
            nonlocal queued
            if self.size_limit is not None and queued + len(chunk) > self.size_limit:
                raise _TooLong
            queued += len(chunk)

        def store(chunk: memoryview) -> None:  # in the worker thread, chunks in order
            nonlocal position
            pwrite_all(self.fd, chunk, position)
            hasher.update(chunk)
            position += len(chunk)
            write_behind.wrote(position)

        def stored(chunk: memoryview) -> None:
            self.written += len(chunk)
            self.consumed = min((reader.position for reader in self.followers), default=0)
            if live:
                self.readable = self.written
                self._notify()

        try:
            async with blob:
                await pump(blob, store, accept=accept, on_done=stored)
        except _TooLong:
            # the worker has stopped: nothing writes to the file any more
            self._drop(f"grows past the {self.size_limit} bytes its manifest gives", unlink=True)
            raise StoreError(
                f"blob cache: {self.source or 'the source'} sent more than the {self.size_limit} bytes the "
                f"manifest gives {self.digest}"
            ) from None
        return hasher.hexdigest() == self.hexpart

    def _drop(self, why: str, *, unlink: bool = False) -> None:
        """Drop the file's content (and the partial's name, when the download ends here)."""
        again = "" if unlink else "; the blob is fetched again from zero"
        log.warning("blob cache: %s %s; dropping it%s", self.path, why, again)
        os.ftruncate(self.fd, 0)
        self.written = self.readable = 0
        self.epoch += 1
        if unlink and self.named:
            unlink_if_same(self.dir_fd, self.partial.name, os.fstat(self.fd))

    async def _commit(self) -> None:
        try:
            await threads.run_sync(self._install)
        except (OSError, StoreError) as e:
            # the bytes are verified and every reader has them open: they are served, only not kept
            log.warning("blob cache: %s is verified but could not be stored: %s", self.digest, e)
        STATS.cache_changed()
        self.readable = self.written
        self.done = True

    def _install(self) -> None:
        """The verified file under the final name (unless a verified one is there already); the directory
        fsynced; the file stamped."""
        os.fsync(self.fd)
        st = os.fstat(self.fd)
        final = self.hexpart
        if self.store._holds_verified(self.dir_fd, final, st.st_size, self.algo):
            # another download (another source, another process) finished first, or the blob was stored from
            # another source: its file is identical, and this source is one of its origins now
            log.debug("blob cache: %s is stored already; dropping %s", self.digest, self.path)
            if self.named:
                unlink_if_same(self.dir_fd, self.partial.name, st)
            self._add_origin_to(final)
            return
        if self.named and same_file(self.dir_fd, self.partial.name, st):
            os.rename(self.partial.name, final, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            self._link(final)
        os.fsync(self.dir_fd)
        with contextlib.suppress(OSError):
            os.removexattr(self.fd, SOURCE_XATTR)  # a partial's tag; a blob's are its origins
        if self.source:
            add_origin(self.fd, source_tag(self.source))
        write_stamp(self.fd, os.fstat(self.fd))
        log.debug("blob cache: stored %s (%d bytes)", self.digest, self.written)

    def _add_origin_to(self, final: str) -> None:
        if not self.source:
            return
        try:
            fd = open_regular(self.dir_fd, final, self.directory / final)
        except (OSError, Refused):
            return
        try:
            if origins_can_be_believed(os.fstat(fd), self.store.owner):
                add_origin(fd, source_tag(self.source))  # EPERM on another user's file: nothing recorded
        finally:
            os.close(fd)

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
                unlink_if_same(self.dir_fd, final, st)
        raise StoreError(f"blob cache: cannot store {self.digest} under {self.directory / final}")


class _TooLong(Exception):
    """A source sent more than the size the verified manifest gives."""


class FollowingBlob(Blob):
    """A reader of a download in progress: reads the file as it grows (or once verified, for resumed bytes).

    It ends (``b""``) only once the download verified the digest, and raises the download's error otherwise, so
    it ``verifies_digest``. ``size`` is the size its asker expects (checked by the producer at the end)."""

    verifies_digest = True
    origin = "network"

    def __init__(self, download: Download, expected_size: int | None, starter: bool) -> None:
        self._download = download
        self._fd: int | None = reopen(download.fd)
        #: the next byte this reader gives out
        self.position = 0
        self._epoch = download.epoch
        self._starter = starter
        self.size = expected_size if expected_size is not None else -1
        download.followers.add(self)
        download.store._reading[download.digest] += 1

    @property  # type: ignore[override]
    def fetch(self) -> Fetch | None:
        """The download's network side (none before its source answered, nor for a blob resumed from disk whole)."""
        return self._download.fetch

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
            if self.position:
                raise StoreError(f"corrupted blob, expecting {download.digest}")
            self._epoch = download.epoch

    def _check_not_short(self) -> None:
        """After a read that got nothing: fine if the download dropped its file meanwhile (``readable`` went
        back), an error if the file is shorter than what the download says it wrote."""
        if self.position < self._download.readable:
            raise StoreError(f"blob cache: {self._download.path} is shorter than what was written to it")

    async def read(self, max_bytes: int) -> bytes:
        download = self._download
        while True:
            self._check_epoch()
            if self.position < download.readable:
                n = min(max_bytes, download.readable - self.position)
                data = await threads.run_sync(os.pread, self._fd, n, self.position)
                if data:
                    self.position += len(data)
                    return data
                # never an end: the download dropped the file meanwhile (then it says so), or the file is short
                self._check_not_short()
                continue
            if download.done:
                if download.error is not None:
                    raise self._failure()
                return b""
            await download.wait_for_more(self.position)

    async def send_to(self, writer: trio.lowlevel.FdStream, moved: Callable[[int], None] | None = None) -> int:
        """All of the blob into a pipe by sendfile, as it becomes readable; the bytes sent (``moved`` is told each
        count)."""
        download = self._download
        assert self._fd is not None
        while True:
            self._check_epoch()
            if self.position < download.readable:
                reached = await splice_file(self._fd, download.readable, writer, start=self.position, moved=moved)
                if reached == self.position:
                    self._check_not_short()
                self.position = reached
                continue
            if download.done:
                if download.error is not None:
                    raise self._failure()
                return self.position
            await download.wait_for_more(self.position)

    async def aclose(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        download = self._download
        download.followers.discard(self)
        download.store._release(download.digest)
        if not download.followers and not download.done:
            # nobody wants it any more: stop the transfer; the partial stays for the next pull
            download.cancel_scope.cancel()
