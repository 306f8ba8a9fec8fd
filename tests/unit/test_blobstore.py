"""BlobStore without the network: eviction, lookups, paths; downloads from in-memory sources (shared per source,
resumed bytes verified before they are served), and a cache directory that defends itself."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from protocol.errors import ErrorCode, ProxyError
from proxy.cache import files, writeback
from proxy.cache import store as blobstore
from proxy.cache.directory import Refused
from proxy.cache.files import ORIGINS_XATTR, SOURCE_XATTR, STAMP_XATTR, source_tag, verification_stamp
from proxy.cache.store import BlobStore, CachedBlob, StoreError
from proxy.common.pipes import CHUNK_SIZE
from proxy.sources.base import Blob
from tests.support.pagecache import resident_pages

GUARD = 10.0
DATA = bytes(range(256)) * 1000  # 256,000 bytes: several chunks
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
HEX = DIGEST.split(":")[1]


def put(store: BlobStore, data: bytes, atime: int, origin: str | None = "r") -> Path:
    """A blob in the cache, as a download from ``origin`` leaves it (None: from no source, as an older cache)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = store.final_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(atime, path.stat().st_mtime_ns))
    if origin is not None:
        os.setxattr(path, ORIGINS_XATTR, source_tag(origin))
    return path


def test_eviction_removes_least_recently_used_first_and_never_leaves_the_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / ("a" * 64)
    precious.write_bytes(b"x" * 5000)
    store = BlobStore(tmp_path / "cache", max_bytes=2500)
    (store.blobs / "sha384").symlink_to(outside)  # a trap: must not be followed
    (store.blobs / "README").write_text("a stray file")
    old = put(store, b"o" * 1000, atime=1_000_000_000_000_000_000)
    mid = put(store, b"m" * 1000, atime=1_100_000_000_000_000_000)
    new = put(store, b"n" * 1000, atime=1_200_000_000_000_000_000)
    store.evict()
    assert not old.exists() and mid.exists() and new.exists()
    assert precious.read_bytes() == b"x" * 5000 and (store.blobs / "README").exists()


def test_eviction_takes_abandoned_partials_too_but_never_one_being_written(tmp_path):
    """Partials count, and go by their last write as blobs go by their last read: junk a client's own registry left
    cannot push the cache's blobs out for good. A partial a download holds (its lock) stays."""
    import fcntl

    store = BlobStore(tmp_path / "cache", max_bytes=2500)
    directory = store.blobs / "sha256"
    directory.mkdir(parents=True, exist_ok=True)
    abandoned, held = directory / (("a" * 64) + ".partial"), directory / (("b" * 64) + ".partial")
    for partial, when in ((abandoned, 1_000_000_000), (held, 900_000_000)):
        partial.write_bytes(b"p" * 1000)
        os.utime(partial, (when, when))
    blob = put(store, b"n" * 1000, atime=1_200_000_000_000_000_000)
    with open(held, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store.evict()
    assert held.exists() and not abandoned.exists() and blob.exists()


async def test_a_blob_larger_than_the_whole_cache_is_streamed_not_stored(tmp_path):
    store = BlobStore(tmp_path / "cache", max_bytes=len(DATA) - 1)
    source = Source()
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            blob = await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r", size_limit=len(DATA))
            assert await read_all(blob) == DATA
    assert source.opened == [0]
    assert not store.final_path(DIGEST).exists() and not partial_of(store).exists()


def test_a_blob_being_read_is_not_evicted(tmp_path):
    store = BlobStore(tmp_path, max_bytes=1500)
    old = put(store, b"o" * 1000, atime=1_000_000_000_000_000_000)
    put(store, b"n" * 1000, atime=1_200_000_000_000_000_000)
    digest = "sha256:" + old.name
    store._reading[digest] += 1
    store.evict()
    assert old.exists()


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "md5:" + "a" * 32, "sha256:" + "A" * 64])
def test_invalid_digests_never_name_a_path(tmp_path, digest):
    with pytest.raises(StoreError):
        BlobStore(tmp_path).final_path(digest)


# ------------------------------------------------------------------------------------------- an in-memory source


class Source:
    """A registry as ``open_from`` sees it: serves ``data`` from an offset, records the offsets asked for; with
    ``hold_at``, a transfer stops there until ``release`` is set (a trickling registry)."""

    def __init__(self, data: bytes = DATA, hold_at: int | None = None, fail: ProxyError | None = None) -> None:
        self.data = data
        self.opened: list[int] = []
        self.hold_at = hold_at
        self.release = trio.Event()
        self.held = trio.Event()
        self.fail = fail

    async def open_from(self, offset: int) -> Blob:
        self.opened.append(offset)
        if self.fail is not None:
            raise self.fail
        return _SourceBlob(self, offset)


class PacedSource(Source):
    """A registry that sends at most :data:`AHEAD` bytes ahead of what the reader has read (``reader_at``): the
    reader keeps up with the download, as a client reading its pipe as the bytes come does."""

    AHEAD = writeback.STEP // 2

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_up_to = 0
        self.moved = trio.Event()

    def reader_at(self, position: int) -> None:
        self.read_up_to = position
        self.moved.set()
        self.moved = trio.Event()


class _SourceBlob(Blob):
    def __init__(self, source: Source, offset: int) -> None:
        self._source = source
        self._pos = offset
        self.size = len(source.data)

    async def read(self, max_bytes: int) -> bytes:
        source = self._source
        while isinstance(source, PacedSource) and self._pos - source.read_up_to >= PacedSource.AHEAD:
            await source.moved.wait()
        end = min(self._pos + max_bytes, len(source.data))
        if source.hold_at is not None and self._pos < source.hold_at <= end:
            end = source.hold_at
        if source.hold_at is not None and self._pos == source.hold_at:
            source.held.set()
            await source.release.wait()
        chunk = source.data[self._pos : end]
        self._pos = end
        await trio.sleep(0)
        return chunk

    async def aclose(self) -> None:
        pass


@asynccontextmanager
async def spawner() -> AsyncIterator[Callable]:
    async with trio.open_nursery() as nursery:
        yield lambda work: nursery.start_soon(work)
        nursery.cancel_scope.cancel()


async def read_all(blob: Blob) -> bytes:
    out = bytearray()
    async with blob:
        while chunk := await blob.read(CHUNK_SIZE):
            out += chunk
    return bytes(out)


def partial_of(store: BlobStore) -> Path:
    return store.partial_path(DIGEST)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ------------------------------------------------------------------------------------- shared downloads per source


async def test_a_download_from_another_source_is_not_joined_and_a_trickle_does_not_hold_the_victim(tmp_path):
    """The attacker's source trickles (held at 1000 bytes); the victim's GetBlob of the same digest from its own
    source gets its own download, in an anonymous file (the attacker's download holds the partial), and completes.
    The attacker's download goes on; once it finishes, the verified file stays as it is."""
    store = BlobStore(tmp_path / "cache")
    hostile, genuine = Source(hold_at=1000), Source()
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            attacker = await store.fetch(DIGEST, len(DATA), hostile.open_from, spawn, source="evil.example:5000")
            got_attacker = bytearray()
            first = await attacker.read(CHUNK_SIZE)
            got_attacker += first
            await hostile.held.wait()
            victim = await store.fetch(DIGEST, len(DATA), genuine.open_from, spawn, source="registry.example")
            assert await read_all(victim) == DATA
            assert genuine.opened == [0]
            assert store.final_path(DIGEST).read_bytes() == DATA
            assert partial_of(store).exists(), "the attacker's download keeps its own partial"
            final_inode = store.final_path(DIGEST).stat().st_ino
            hostile.release.set()
            got_attacker += await read_all(attacker)
    assert bytes(got_attacker) == DATA
    assert store.final_path(DIGEST).stat().st_ino == final_inode, "the first verified file stays"
    assert not partial_of(store).exists()
    assert hostile.opened == [0]


async def test_a_blob_is_served_only_to_the_repository_it_was_downloaded_from(tmp_path):
    """A victim pulled a private layer from its repository. The attacker names a repository of its own whose manifest
    names that digest: its registry has no such blob (404). The attacker gets its registry's answer, never the
    cache's bytes; a genuine second repository holding the blob downloads it once, then both are served from disk."""
    store = BlobStore(tmp_path / "cache")
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            victim = Source()
            blob = await store.fetch(DIGEST, len(DATA), victim.open_from, spawn, source="registry.example/team/private")
            assert await read_all(blob) == DATA and store.final_path(DIGEST).read_bytes() == DATA
            evil = Source(fail=ProxyError("blob unknown to registry"))
            with pytest.raises(ProxyError, match="blob unknown"):
                await read_all(await store.fetch(DIGEST, len(DATA), evil.open_from, spawn, source="evil.example/x"))
            assert evil.opened == [0]
            assert await store.open_cached(DIGEST, len(DATA), "evil.example/x") is None
            other = Source()
            for _ in range(2):  # downloaded from the second repository once, then from disk
                again = await store.fetch(DIGEST, len(DATA), other.open_from, spawn, source="registry.example/team/b")
                assert await read_all(again) == DATA
            assert other.opened == [0] and victim.opened == [0]
            cached = await store.open_cached(DIGEST, len(DATA), "registry.example/team/private")
            assert isinstance(cached, CachedBlob)
            await cached.aclose()
    tags = os.getxattr(store.final_path(DIGEST), ORIGINS_XATTR).split()
    assert tags == [source_tag("registry.example/team/private"), source_tag("registry.example/team/b")]


async def test_a_full_list_of_origins_keeps_its_tags(tmp_path):
    """Nobody can push another's tag out by downloading a popular blob from many repositories of its own."""
    store = BlobStore(tmp_path / "cache")
    path = put(store, DATA, atime=1_000_000_000_000_000_000, origin="victim/repo")
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            for n in range(files.MAX_ORIGINS + 3):
                source = f"evil.example/r{n}"
                assert await read_all(await store.fetch(DIGEST, len(DATA), Source().open_from, spawn, source=source))
    tags = os.getxattr(path, ORIGINS_XATTR).split()
    assert len(tags) == files.MAX_ORIGINS and tags[0] == source_tag("victim/repo")
    cached = await store.open_cached(DIGEST, len(DATA), "victim/repo")
    assert isinstance(cached, CachedBlob)
    await cached.aclose()


async def test_the_cache_owners_blobs_are_hits_for_another_user_and_never_replaced(tmp_path):
    """A proxy spawned as root sharing the daemon's cache (the directory and its blobs another user's): the origins
    of the owner's blobs are believed, so a pull from that source is a hit; a pull from another source downloads and
    keeps the owner's file as it is (it hashes right), instead of putting a file of its own in its place. Needs
    root, as CI runs the suite."""
    assert os.geteuid() == 0, "this test plays root beside another user's cache: run the suite as root (CI does)"
    store_dir = tmp_path / "cache"
    BlobStore(store_dir).close()
    owner = 65534
    path = put(BlobStore(store_dir), DATA, atime=1_000_000_000_000_000_000, origin="r")
    for place in (store_dir, store_dir / "blobs", path.parent, path):
        os.chown(place, owner, owner)
    store = BlobStore(store_dir)
    assert store.owner == owner
    inode = path.stat().st_ino
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            source = Source()
            assert await read_all(await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")) == DATA
            assert source.opened == []  # a hit: the owner's origins are believed
            other = Source()
            assert await read_all(await store.fetch(DIGEST, len(DATA), other.open_from, spawn, source="o")) == DATA
            assert other.opened == [0]
    assert path.stat().st_ino == inode and path.stat().st_uid == owner
    os.unlink(path)  # what root downloads into the owner's cache is the owner's (tags included)
    async with spawner() as spawn:
        assert await read_all(await store.fetch(DIGEST, len(DATA), Source().open_from, spawn, source="o")) == DATA
    assert path.stat().st_uid == owner
    assert os.getxattr(path, ORIGINS_XATTR).split() == [source_tag("o")]


async def test_a_blob_without_origins_is_downloaded_again_once(tmp_path):
    """A cache written before origins were recorded: its blobs are served to no source until one downloads them."""
    store = BlobStore(tmp_path / "cache")
    put(store, DATA, atime=1_000_000_000_000_000_000, origin=None)
    source = Source()
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            for _ in range(2):
                assert await read_all(await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")) == DATA
    assert source.opened == [0]


async def test_a_follower_does_not_get_the_error_of_the_client_that_started_the_download(tmp_path):
    store = BlobStore(tmp_path / "cache")
    starter_source = Source(hold_at=1000)
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            starter = await store.fetch(DIGEST, len(DATA), starter_source.open_from, spawn, source="r")
            follower = await store.fetch(DIGEST, len(DATA), Source().open_from, spawn, source="r")
            await starter_source.held.wait()
            # the starter's source now fails for good (its image was deleted, say)
            starter_source.data = starter_source.data[:1000]
            starter_source.release.set()
            with pytest.raises(StoreError) as starter_error:
                await read_all(starter)
            with pytest.raises(StoreError) as follower_error:
                await read_all(follower)
    assert "corrupted blob" in str(starter_error.value)  # the store's own error: the same for every reader
    assert str(follower_error.value) == str(starter_error.value)

    private = ProxyError("docker://evil.example/secret-image: fetching blob: 404")
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            failing = Source(fail=private)

            async def open_later(offset: int) -> Blob:
                await follower_joined.wait()
                return await failing.open_from(offset)

            follower_joined = trio.Event()
            starter = await store.fetch(DIGEST, len(DATA), open_later, spawn, source="r")
            follower = await store.fetch(DIGEST, len(DATA), Source().open_from, spawn, source="r")
            follower_joined.set()
            with pytest.raises(ProxyError, match="secret-image"):
                await read_all(starter)
            with pytest.raises(StoreError) as error:
                await read_all(follower)
    assert "secret-image" not in str(error.value) and "shared with another pull" in str(error.value)
    assert error.value.code is ErrorCode.RETRYABLE


# ------------------------------------------------------------------------------------------------ partials


async def test_a_wrong_partial_of_the_same_source_is_dropped_and_fetched_again_in_the_same_request(tmp_path):
    """Resumed bytes reach no reader before the whole blob is verified; when it does not match, the download
    starts again from zero for the same readers, who get the blob."""
    store = BlobStore(tmp_path / "cache")
    partial = partial_of(store)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\0" * 1000)  # not the blob's first 1000 bytes
    os.setxattr(partial, SOURCE_XATTR, source_tag("r"))
    source = Source()
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            blob = await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")
            assert await read_all(blob) == DATA
    assert source.opened == [1000, 0]
    assert store.final_path(DIGEST).read_bytes() == DATA and not partial.exists()


async def test_resumed_bytes_are_served_only_once_the_blob_is_verified(tmp_path):
    store = BlobStore(tmp_path / "cache")
    partial = partial_of(store)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(DATA[:1000])
    os.setxattr(partial, SOURCE_XATTR, source_tag("r"))
    source = Source(hold_at=200_000)
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            blob = await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")
            first: list[bytes] = []

            async def read_first() -> None:
                first.append(await blob.read(CHUNK_SIZE))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_first)
                await source.held.wait()  # everything up to 200,000 is written
                await trio.testing.wait_all_tasks_blocked()
                assert first == [], "resumed bytes were served before the blob was verified"
                source.release.set()
            assert first[0] + await read_all(blob) == DATA
    assert source.opened == [1000]


async def test_a_partial_from_another_source_is_neither_resumed_nor_truncated(tmp_path):
    """Another source's download left bytes in the partial (wrong ones, here): the victim's download from its own
    source neither resumes them (that source's registry could "complete" bytes it does not have by guessing the last
    ones) nor truncates them (their source's next pull resumes them): it writes an anonymous file."""
    store = BlobStore(tmp_path / "cache")
    partial = partial_of(store)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\0" * 5000)
    os.setxattr(partial, SOURCE_XATTR, source_tag("evil.example"))
    source = Source()
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            assert await read_all(await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")) == DATA
    assert source.opened == [0]
    assert partial.read_bytes() == b"\0" * 5000 and store.final_path(DIGEST).read_bytes() == DATA


async def test_a_partial_of_an_unknown_source_is_started_again(tmp_path):
    """Where xattrs cannot be written, a partial says nothing of its source: nobody resumes it."""
    store = BlobStore(tmp_path / "cache")
    partial = partial_of(store)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(DATA[:1000])
    source = Source()
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            assert await read_all(await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")) == DATA
    assert source.opened == [0]


# ---------------------------------------------------------------------------------------------- client sizes


async def test_a_wrong_client_size_never_removes_a_verified_blob(tmp_path):
    store = BlobStore(tmp_path / "cache")
    path = put(store, DATA, atime=1_000_000_000_000_000_000)
    source = Source(fail=ProxyError("the registry is down"))
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            for asked in (len(DATA) + 1, len(DATA) - 1):
                blob = await store.fetch(DIGEST, asked, source.open_from, spawn, source="r")
                assert isinstance(blob, CachedBlob) and blob.size == len(DATA)  # the asker's producer reports it
                await blob.aclose()
                assert path.read_bytes() == DATA
            blob = await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")
            assert await read_all(blob) == DATA
    assert source.opened == []


# ------------------------------------------------------------------------------------------- stamps and trust


@pytest.mark.parametrize("untrusted", ["another owner", "group-writable", "other-writable", "hard-linked"])
async def test_a_stamp_on_a_file_the_proxy_does_not_own_alone_is_not_believed(tmp_path, untrusted):
    """Wrong bytes under a digest name, with a forged stamp: re-hashed, removed, never served."""
    if untrusted == "another owner" and os.geteuid() != 0:
        pytest.fail("giving a file to another user needs root (CI runs as root)")
    store = BlobStore(tmp_path / "cache")
    path = put(store, DATA, atime=1_000_000_000_000_000_000)
    wrong = bytearray(DATA)
    wrong[100] ^= 0xFF
    path.write_bytes(bytes(wrong))
    if untrusted == "another owner":
        os.chown(path, 4242, 4242)
    elif untrusted == "group-writable":
        path.chmod(0o660)
    elif untrusted == "other-writable":
        path.chmod(0o602)
    else:
        os.link(path, tmp_path / "elsewhere")
    os.setxattr(path, STAMP_XATTR, verification_stamp(path.stat()))
    assert await store.open_cached(DIGEST, len(DATA)) is None
    assert not path.exists()


async def test_a_good_untrusted_file_is_re_hashed_on_every_use_and_its_own_stamp_believed(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "cache")
    path = put(store, DATA, atime=1_000_000_000_000_000_000)
    hashed = []
    real = blobstore.hash_fd
    monkeypatch.setattr(blobstore, "hash_fd", lambda *a: hashed.append(a) or real(*a))
    path.chmod(0o664)
    for _ in range(2):
        blob = await store.open_cached(DIGEST)
        assert blob is not None
        await blob.aclose()
    assert len(hashed) == 2, "a group-writable file is hashed each time"
    assert STAMP_XATTR not in os.listxattr(path), "and never stamped"
    path.chmod(0o600)
    for _ in range(2):
        blob = await store.open_cached(DIGEST)
        assert blob is not None
        await blob.aclose()
    assert len(hashed) == 3, "our own file: hashed once, then its stamp is believed"


# ------------------------------------------------------------------------------------------ symlinks and modes


def plant(outside: Path) -> dict[str, int]:
    """``outside/precious``, holding the blob's own bytes (so that only a refusal keeps it from being used), with
    an atime before its mtime: reading it would move the atime (relatime). Returns what ``untouched`` checks."""
    outside.mkdir()
    target = outside / "precious"
    target.write_bytes(DATA)
    st = target.stat()
    os.utime(target, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    return snapshot(outside)


def snapshot(outside: Path) -> dict[str, int]:
    return {str(p): p.stat().st_atime_ns for p in sorted(outside.rglob("*"))}


def untouched(outside: Path, before: dict[str, int]) -> None:
    """Nothing under ``outside`` was created, removed or read (atimes first: the check itself reads), nor written."""
    assert snapshot(outside) == before
    assert (outside / "precious").read_bytes() == DATA


@pytest.mark.parametrize("link", ["blobs", "blobs/sha256", "partial", "blob"])
async def test_a_symlink_in_the_cache_is_refused_and_nothing_outside_is_touched(tmp_path, caplog, link):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    before = plant(outside)
    planted = {
        "blobs": cache / "blobs",
        "blobs/sha256": cache / "blobs" / "sha256",
        "partial": cache / "blobs" / "sha256" / (HEX + ".partial"),
        "blob": cache / "blobs" / "sha256" / HEX,
    }[link]
    planted.parent.mkdir(parents=True)
    planted.symlink_to(outside / "precious" if link in ("partial", "blob") else outside)
    source = Source()
    caplog.set_level(logging.DEBUG, logger="proxy.cache.store")
    with trio.fail_after(GUARD):
        store = BlobStore(cache)
        async with spawner() as spawn:
            for _ in range(2):
                assert await read_all(await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")) == DATA
        assert await store.open_cached(DIGEST) is None
    assert source.opened == [0, 0], "streamed uncached each time"
    untouched(outside, before)
    assert planted.is_symlink()
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR and f"refusing {planted}" in r.getMessage()]
    assert len(refusals) == 1, "one log line names it"
    with pytest.raises(Refused):
        store._lookup_sync(DIGEST) if link != "partial" else blobstore.Download(store, DIGEST, "r", None)


async def test_a_hard_linked_partial_is_never_written(tmp_path):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    before = plant(outside)
    partial = cache / "blobs" / "sha256" / (HEX + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    os.link(outside / "precious", partial)
    source = Source()
    store = BlobStore(cache)
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            assert await read_all(await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")) == DATA
    untouched(outside, before)
    assert not store.final_path(DIGEST).exists()


async def test_what_the_cache_creates_is_private(tmp_path):
    old = os.umask(0o022)
    try:
        cache = tmp_path / "new" / "cache"
        store = BlobStore(cache)
        source = Source(hold_at=100_000)
        with trio.fail_after(GUARD):
            async with spawner() as spawn:
                blob = await store.fetch(DIGEST, len(DATA), source.open_from, spawn, source="r")
                await source.held.wait()
                assert mode(partial_of(store)) == 0o600
                source.release.set()
                assert await read_all(blob) == DATA
    finally:
        os.umask(old)
    assert [mode(p) for p in (tmp_path / "new", cache, cache / "blobs", cache / "blobs" / "sha256")] == [0o700] * 4
    assert mode(store.final_path(DIGEST)) == 0o600


def test_an_existing_cache_directory_keeps_its_mode(tmp_path):
    """Under systemd, CacheDirectory= made DIR with CacheDirectoryMode=: only what we create is private."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o750)
    store = BlobStore(cache)
    assert mode(cache) == 0o750 and mode(store.blobs) == 0o700


async def test_a_source_sending_more_than_the_manifest_says_is_cut_off_there(tmp_path):
    # an endless body (here: 64 x the blob) must not fill the cache's disk: the download stops at the size the
    # verified manifest gives, drops what it wrote, and fails with a text naming the source
    store = BlobStore(tmp_path / "cache")
    endless = Source(data=DATA * 64)
    async with spawner() as spawn:
        blob = await store.fetch(
            DIGEST, len(DATA), endless.open_from, spawn, source="evil.example", size_limit=len(DATA)
        )
        with pytest.raises(StoreError, match=r"evil\.example sent more than the 256000 bytes the manifest gives"):
            await read_all(blob)
    assert not partial_of(store).exists()
    assert store.final_path(DIGEST).exists() is False


# ------------------------------------------------------------------------------------- write-behind of a fill

BIG = os.urandom(4 * writeback.STEP + 1000)
BIG_DIGEST = "sha256:" + hashlib.sha256(BIG).hexdigest()


async def test_a_fill_drops_from_the_page_cache_what_its_reader_has_read(tmp_path):
    # the reader follows the download: what it has read (and is on disk) leaves the page cache as the fill goes,
    # so a large pull does not take the machine's memory; the blob is whole and verified. The registry sends at
    # most half a step ahead of the reader (a reader that lags more keeps its pages: the next test): without that
    # a loaded machine could let the fill finish before the reader started
    store = BlobStore(tmp_path / "cache")
    source = PacedSource(BIG)
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            blob = await store.fetch(BIG_DIGEST, len(BIG), source.open_from, spawn, source="registry.example")
            got = bytearray()
            while chunk := await blob.read(1 << 20):
                got += chunk
                source.reader_at(len(got))
            assert bytes(got) == BIG
    final = store.final_path(BIG_DIGEST)
    first_step = writeback.STEP // os.sysconf("SC_PAGE_SIZE")
    assert not any(resident_pages(final)[:first_step]), "the first step was read and written: dropped"
    assert final.read_bytes() == BIG


async def test_a_fill_keeps_in_the_page_cache_what_a_slow_reader_has_not_read(tmp_path):
    store = BlobStore(tmp_path / "cache")
    source = Source(data=BIG)
    with trio.fail_after(GUARD):
        async with spawner() as spawn:
            fast = await store.fetch(BIG_DIGEST, len(BIG), source.open_from, spawn, source="registry.example")
            slow = await store.fetch(BIG_DIGEST, len(BIG), source.open_from, spawn, source="registry.example")
            assert await read_all(fast) == BIG  # the download is done: the slow reader has read nothing yet
            final = store.final_path(BIG_DIGEST)
            assert all(resident_pages(final)), "nothing the slow reader has not read was dropped"
            assert await read_all(slow) == BIG
    assert source.opened == [0]
