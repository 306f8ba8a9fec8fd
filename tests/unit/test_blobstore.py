"""BlobStore pieces that need no network: eviction, lookups, paths."""

import hashlib
import os
from pathlib import Path

import pytest

from proxy.blobstore import BlobStore, StoreError


def put(store: BlobStore, data: bytes, atime: int) -> Path:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = store.final_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(atime, path.stat().st_mtime_ns))
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


def test_a_blob_being_read_is_not_evicted(tmp_path):
    store = BlobStore(tmp_path, max_bytes=1500)
    old = put(store, b"o" * 1000, atime=1_000_000_000_000_000_000)
    put(store, b"n" * 1000, atime=1_200_000_000_000_000_000)
    digest = "sha256:" + old.name
    store._reading[digest] += 1
    store.evict()
    assert old.exists()


def test_a_symlink_under_a_digest_name_is_not_served(tmp_path):
    store = BlobStore(tmp_path / "cache")
    target = tmp_path / "elsewhere"
    data = b"looks right"
    target.write_bytes(data)
    path = store.final_path("sha256:" + hashlib.sha256(data).hexdigest())
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    assert store._lookup_sync("sha256:" + hashlib.sha256(data).hexdigest(), None) is None
    assert target.exists() and path.is_symlink()


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "md5:" + "a" * 32, "sha256:" + "A" * 64])
def test_invalid_digests_never_name_a_path(tmp_path, digest):
    with pytest.raises(StoreError):
        BlobStore(tmp_path).final_path(digest)
