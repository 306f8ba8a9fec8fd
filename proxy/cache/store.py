"""A verified, crash-safe local blob cache: ``DIR/blobs/<algo>/<hex>``, shared by every client of a daemon.

Storing:

- A download writes ``<hex>.partial`` beside the final name, holding an exclusive lock on it. Only when its digest
  matches is the file fsynced, moved to the final name and the directory fsynced: nothing unverified is ever under
  a digest name.
- A partial survives failures and restarts: the next download of that digest from the same source (this process
  or another) re-hashes the partial and asks the registry for the rest with a Range request. The partial records
  its source (xattr ``user.image-proxy.source``, a hash of it); a download from another source leaves it alone.
- Bytes resumed from disk are not trusted before the whole blob is verified: readers get them only then. If the
  finished file does not match its digest, the partial is dropped (with a log line) and the download starts again
  from zero in the same request, once, so its readers still get the blob. A download from zero that does not match
  fails its readers (``corrupted blob``): its source sent wrong bytes.

Sharing (single flight) is keyed by digest **and source** — the repository that served the client's manifest (see
"Who is served what" below; mirrors and rewrites are the administrator's registries.conf).
Every reader of a digest being downloaded from the same source follows the growing file, so concurrent GetBlobs of
one image share one upstream transfer; a reader never waits on, or fails with, a registry it did not name.
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

Who is served what: a client is served a cached blob, or follows a download, or resumes a partial, only from its
source — the repository that served its image's manifest (``registry.example/team/app``, or the mirror's
repository that answered for that name: ``RegistrySource.cache_key``). Opening the image fetched that manifest with
the client's own credentials, so that registry let it read that repository. Each verified blob records the sources
it was downloaded from (xattr ``user.image-proxy.origins``: 128-bit hashes, at most ``MAX_ORIGINS``, never pushed
out; believed only on this process's files or the cache directory owner's). Another source's client downloads the
blob from its own registry (the bytes prove that registry has them), and its source is added. The cache is keyed by
digest, and digests are not secrets: without this, a client could open an image on a registry of its own whose
manifest names another client's private layer, and be served that layer from the cache. The cost: a blob shared by
two repositories is downloaded once per repository. Where xattrs cannot be written, no origin is recorded and every
pull downloads. The check comes before any hashing, so a blob of another source costs a lookup what no blob costs.
Another source's partial is neither resumed (its registry could "complete" bytes it does not have by guessing the
last ones) nor truncated (its own source resumes it): the download writes an anonymous file. A proxy running as
root in another user's cache directory (one spawned by an agent, in the daemon's) gives that user what it creates.

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
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocol.digests import parse_digest
from protocol.errors import ProtocolViolation
from proxy.cache.directory import (
    PARTIAL_SUFFIX,
    CacheDir,
    Changed,
    Entry,
    Refused,
    is_writable,
    open_regular,
    open_subdir,
)
from proxy.cache.download import Download, FollowingBlob
from proxy.cache.files import (
    MAX_REFUSALS_LOGGED,
    Busy,
    StoreError,
    has_origin,
    has_valid_stamp,
    hash_fd,
    make_private_dirs,
    source_tag,
    stamp_can_be_believed,
    unlink_if_same,
    write_stamp,
)
from proxy.common import threads
from proxy.server.metrics import STATS
from proxy.sources.base import Blob, FileWindow

log = logging.getLogger(__name__)
#: how many times a fetch looks the blob up while downloads end meanwhile (then it downloads it, as before)
LOOKUPS = 3


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
    origin = "cache"

    def window(self) -> FileWindow:
        """The unread bytes of the open, verified file: producers send it with sendfile, ranges are pread."""
        if self._fd is None:
            raise ValueError("blob is closed")
        return FileWindow(self._fd, self._pos, self.size - self._pos, read_once=True)

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
        #: downloads that ended so far: a lookup (in a worker thread) that a download ended during may have missed
        #: the blob it stored, and is made again
        self.downloads_ended = 0
        self._reading: collections.Counter[str] = collections.Counter()
        self._refusals_logged: set[str] = set()
        try:
            make_private_dirs(self.root)
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"blob cache {self.root}: cannot create it: {e.strerror}") from None
        #: the cache directory's owner, whose blobs' origins are believed (as this process's own)
        self.owner = os.fstat(self._root_fd).st_uid
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

    def _holds_verified(self, dir_fd: int, name: str, size: int, algo: str) -> bool:
        """Whether ``name`` is a regular file of ``size`` bytes that holds the blob: its stamp can be believed, or
        its content hashes to ``name`` (a file of another user, e.g. the daemon's, is kept, never replaced)."""
        try:
            fd = open_regular(dir_fd, name, Path(name))
        except (OSError, Refused):
            return False
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                return False
            return has_valid_stamp(fd, st) or hash_fd(fd, algo)[0].hexdigest() == name
        finally:
            os.close(fd)

    def _lookup_sync(self, digest: str, source: str | None = None) -> tuple[int, os.stat_result] | None:
        """The verified cached blob, open (its fd and stat), or None; a wrong file is removed (with a log line).
        With ``source``: None unless the blob was downloaded from that source (its origins), which the asker showed it
        may read (see the module's "Who is served what"). Raises Refused when the name (or a directory above it) is
        not what the cache puts there."""
        tag = None if source is None else source_tag(source)
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
                if tag is not None and not has_origin(fd, st, tag, self.owner):
                    # before any hashing: a blob of another source costs what no blob costs
                    log.debug("blob cache: %s is stored, but not from this client's source", digest)
                    os.close(fd)
                    return None
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
                    unlink_if_same(dir_fd, hexpart, st)
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

    async def open_cached(
        self, digest: str, expected_size: int | None = None, source: str | None = None
    ) -> CachedBlob | None:
        """The verified cached blob (downloaded from ``source``, when given), or None (a wrong file is removed, a
        refused path logged).

        ``expected_size`` is not checked here: a verified blob is what it is, and a size that disagrees is the
        asker's error, reported by the producer (``expected N bytes in blob, got M``)."""
        try:
            found = await threads.run_sync(self._lookup_sync, digest, source)
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
        for _ in range(LOOKUPS):
            ended = self.downloads_ended
            try:
                found = await threads.run_sync(self._lookup_sync, digest, source or None)
            except Refused as e:
                self._refused(e)
                return await open_from(0)
            if found is not None:
                return self._file_blob(digest, *found)
            if self.read_only:
                return await open_from(0)
            if self.max_bytes is not None and size_limit is not None and size_limit > self.max_bytes:
                log.info("blob cache: %s (%d bytes) is larger than the whole cache; streaming it", digest, size_limit)
                return await open_from(0)
            download = self._downloads.get((digest, source))
            # a download that ended while the lookup ran may have stored the blob after the lookup passed: then
            # look again, rather than download it a second time (the fifty-clients test caught it, 1 run in 6)
            if download is not None or self.downloads_ended == ended:
                break
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
            # blobs by last read, partials by last write: an abandoned partial (a download nobody finished, from
            # any source) goes as an unused blob does, so none can push the cache's blobs out for good
            for entry in sorted(entries, key=lambda e: e.atime_ns if e.kind == "blob" else e.mtime_ns):
                if total <= self.max_bytes:
                    break
                digest = f"{entry.algo}:{entry.hexpart}"
                if digest in self._reading or digest in downloading:
                    continue
                try:
                    if not self._evict_one(cache, entry):
                        continue
                except (Changed, OSError):
                    continue  # used (or replaced) since the scan: not the least recently used any more
                log.info(
                    "blob cache: evicting %s (%s of %d bytes) to stay under %d bytes",
                    digest,
                    entry.kind,
                    entry.size,
                    self.max_bytes,
                )
                STATS.cache_changed()
                total -= entry.size

    @staticmethod
    def _evict_one(cache: CacheDir, entry: Entry) -> bool:
        """Remove a blob unused since the scan, or a partial no download holds (another process's included)."""
        if entry.kind == "blob":
            cache.remove(entry, same_atime=True)
            return True
        fd = cache.lock_partial(entry)
        if fd is None:
            return False  # a download is writing it
        try:
            cache.remove(entry)
        finally:
            os.close(fd)
        return True
