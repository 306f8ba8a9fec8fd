"""``image-proxy cache verify|prune|du`` run through ``proxy.cli.main`` on a cache built in tmp_path."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cache import directory as cache_dir
from proxy.cache.files import STAMP_XATTR, verification_stamp
from proxy.cli.main import main
from proxy.commands import cache as cache_command

DAY = 86400


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def put_blob(root: Path, data: bytes, algo: str = "sha256") -> Path:
    path = root / "blobs" / algo / hashlib.new(algo, data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def age(path: Path, *, atime_days: float = 0, mtime_days: float = 0) -> None:
    now = time.time()
    os.utime(path, (now - atime_days * DAY, now - mtime_days * DAY), follow_symlinks=False)


class Cache:
    """A cache holding one of each kind of entry, and a directory outside it that nothing may touch."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "cache"
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.secret = self.outside / "secret"
        self.secret.write_bytes(b"not yours")

        self.good = put_blob(self.root, b"good " * 1000)
        self.good512 = put_blob(self.root, b"good sha512", "sha512")
        self.truncated = put_blob(self.root, b"truncated " * 1000)
        os.setxattr(self.truncated, STAMP_XATTR, verification_stamp(self.truncated.stat()))
        os.truncate(self.truncated, 5000)
        self.flipped = put_blob(self.root, b"flipped " * 1000)
        data = bytearray(self.flipped.read_bytes())
        data[100] ^= 0x01
        self.flipped.write_bytes(bytes(data))

        sha256 = self.root / "blobs" / "sha256"
        self.stale = sha256 / (hashlib.sha256(b"stale").hexdigest() + ".partial")
        self.stale.write_bytes(b"half a blob")
        age(self.stale, atime_days=3, mtime_days=3)
        self.idle = sha256 / (hashlib.sha256(b"idle").hexdigest() + ".partial")
        self.idle.write_bytes(b"resumable")
        self.locked = sha256 / (hashlib.sha256(b"locked").hexdigest() + ".partial")
        self.locked.write_bytes(b"downloading")
        age(self.locked, atime_days=30, mtime_days=30)  # old, but its download holds the lock
        self.foreign = sha256 / "notes.txt"
        self.foreign.write_bytes(b"someone's notes")
        self.foreign_top = self.root / "blobs" / "README"
        self.foreign_top.write_bytes(b"top-level foreign file")
        self.link = sha256 / hashlib.sha256(b"not yours").hexdigest()
        self.link.symlink_to(self.secret)
        self.dir_link = self.root / "blobs" / "sha384"
        self.dir_link.symlink_to(self.outside, target_is_directory=True)

    def assert_outside_untouched(self) -> None:
        assert self.secret.read_bytes() == b"not yours"
        assert self.link.is_symlink() and self.dir_link.is_symlink()
        assert self.foreign_top.exists()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path)
    fd = os.open(c.locked, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running download does
    try:
        yield c
    finally:
        os.close(fd)


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    put_blob(root, b"a" * 3000)
    put_blob(root, b"b" * 2000, "sha512")
    return root


# ---------------------------------------------------------------------------------------------------- verify


def test_verify_reports_every_problem_and_removes_nothing(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "verify", str(cache.root))
    assert code == 1
    lines = out.splitlines()
    by_path = {line.split(": ")[0]: line for line in lines[:-1]}
    assert "corrupt: truncated: 5000 bytes, 10000 when verified" in by_path[str(cache.truncated)]
    assert "corrupt: does not match its digest" in by_path[str(cache.flipped)]
    assert "stale-partial" in by_path[str(cache.stale)]
    assert "foreign: not a sha256 digest name" in by_path[str(cache.foreign)]
    assert "unsafe: a symbolic link: never followed" in by_path[str(cache.link)]
    assert "unsafe: a symbolic link: never followed" in by_path[str(cache.dir_link)]
    assert "foreign" in by_path[str(cache.foreign_top)]
    for fine in (cache.good, cache.good512, cache.idle, cache.locked):
        assert str(fine) not in out
    assert len(lines) == 8
    assert lines[-1].startswith("4 blobs, ")
    assert "2 corrupt" in lines[-1] and "3 partials: 1 in progress, 1 idle, 1 stale" in lines[-1]
    assert "2 foreign, 2 unsafe" in lines[-1]
    for path in (cache.truncated, cache.flipped, cache.stale, cache.foreign):
        assert path.exists()
    cache.assert_outside_untouched()


def test_verify_stamps_good_blobs_and_keeps_their_atime(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = next((clean / "blobs" / "sha256").iterdir())
    age(blob, atime_days=10, mtime_days=1)  # atime older than mtime: a plain read would update it (relatime)
    atime = blob.stat().st_atime_ns
    code, out, _ = run(capsys, "cache", "verify", str(clean))
    assert code == 0
    summary = "2 blobs, 5000 bytes (4.9 KiB): 0 corrupt, 0 unreadable; 0 partials: 0 in progress, 0 idle, 0 stale"
    assert out == summary + "; 0 foreign, 0 unsafe\n"
    assert os.getxattr(blob, STAMP_XATTR) == verification_stamp(blob.stat())
    assert blob.stat().st_atime_ns == atime  # the LRU order that prune and --blob-cache-max rely on


def test_verify_repair(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "verify", "--repair", str(cache.root))
    assert code == 1  # problems were found, even though those that can be are repaired
    for path in (cache.truncated, cache.flipped, cache.stale, cache.foreign):
        assert f"{path}: " in out
        assert not path.exists()
    assert "[removed]" in out and "removed 4 (" in out.splitlines()[-1]
    for kept in (cache.good, cache.good512, cache.idle, cache.locked):
        assert kept.exists()
    cache.assert_outside_untouched()

    # what is left is only what --repair never touches
    code, out, _ = run(capsys, "cache", "verify", "--repair", "--json", str(cache.root))
    report = json.loads(out)
    assert code == 1
    assert {p["path"] for p in report["problems"]} == {str(cache.link), str(cache.dir_link), str(cache.foreign_top)}
    assert {p["action"] for p in report["problems"]} == {""}
    assert report["in_progress"] == 1 and report["idle"] == 1 and report["blobs"] == 2


def test_verify_reports_what_the_proxy_refuses_or_does_not_trust_as_unsafe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Symlinks (a blob, a partial, blobs/<algo> itself) and blobs whose stamp proves nothing (hard-linked, another
    owner, group-writable) are `unsafe`; --repair removes none of them, nor anything they point to."""
    root = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"not yours")
    sha256 = root / "blobs" / "sha256"
    good = put_blob(root, b"good")
    linked_blob = sha256 / hashlib.sha256(b"not yours").hexdigest()
    linked_blob.symlink_to(secret)
    linked_partial = sha256 / (hashlib.sha256(b"partial").hexdigest() + ".partial")
    linked_partial.symlink_to(secret)
    (root / "blobs" / "sha512").symlink_to(outside, target_is_directory=True)
    hard = put_blob(root, b"hard-linked")
    os.link(hard, outside / "another name")
    writable = put_blob(root, b"group-writable")
    writable.chmod(0o664)
    theirs = put_blob(root, b"someone else's")
    os.chown(theirs, 4242, 4242)

    code, out, _ = run(capsys, "cache", "verify", "--repair", "--json", str(root))
    report = json.loads(out)
    assert code == 1
    unsafe = {p["path"]: p["detail"] for p in report["problems"] if p["kind"] == "unsafe"}
    assert set(unsafe) == {
        str(linked_blob),
        str(linked_partial),
        str(root / "blobs" / "sha512"),
        str(hard),
        str(writable),
        str(theirs),
    }
    for link in (linked_blob, linked_partial, root / "blobs" / "sha512"):
        assert unsafe[str(link)].startswith("a symbolic link: never followed")
    assert unsafe[str(hard)].startswith("hard-linked (2 names)")
    assert unsafe[str(writable)].startswith("group- or other-writable (mode 0664)")
    assert unsafe[str(theirs)].startswith("owned by uid 4242, not by uid")
    assert all("re-hashes it before every use" in unsafe[str(p)] for p in (hard, writable, theirs))
    assert {p["kind"] for p in report["problems"]} == {"unsafe"}, "the untrusted blobs are good: nothing else"
    assert {p["action"] for p in report["problems"]} == {""}, "--repair removes none of them"
    assert report["blobs"] == 4 and report["good"] == 4
    for path in (linked_blob, linked_partial, root / "blobs" / "sha512"):
        assert path.is_symlink()
    assert secret.read_bytes() == b"not yours" and sorted(p.name for p in outside.iterdir()) == [
        "another name",
        "secret",
    ]
    assert good.exists() and hard.exists() and writable.exists() and theirs.exists()

    code, out, _ = run(capsys, "cache", "verify", str(root))
    assert code == 1 and out.splitlines()[-1].endswith("0 foreign, 6 unsafe")


def test_verify_stale_after(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "verify", "--stale-after", "7d", str(cache.root))
    assert code == 1  # the other problems are still there
    assert str(cache.stale) not in out
    assert "2 idle, 0 stale" in out


def test_verify_clean_cache_through_blob_cache_flag(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "cache", "verify", "--blob-cache", str(clean))[0] == 0
    assert run(capsys, "cache", "--blob-cache", str(clean), "verify", "--repair")[0] == 0
    assert run(capsys, "cache", "verify", "--blob-cache", str(clean), str(clean))[0] == 0


# ---------------------------------------------------------------------------------------------------- read-only


def test_read_only_cache(cache: Cache, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_dir, "is_writable", lambda path, fd: False)
    code, out, err = run(capsys, "cache", "verify", str(cache.root))
    assert code == 1 and "corrupt" in out and err == ""

    code, out, err = run(capsys, "cache", "verify", "--repair", str(cache.root))
    assert code == 1
    assert "read-only: reporting only, nothing can be repaired" in err
    assert f"{cache.truncated}: corrupt: " in out and "[not repaired: the cache is read-only]" in out
    assert not _has_stamp(cache.good)  # a read-only verify writes nothing, not even stamps

    code, out, err = run(capsys, "cache", "prune", "--older-than", "1d", str(cache.root))
    assert code == 1 and out == ""
    assert "read-only: nothing can be removed" in err

    code, out, _ = run(capsys, "cache", "prune", "--dry-run", "--older-than", "1d", str(cache.root))
    assert code == 0 and "would be removed" in out
    for path in (cache.truncated, cache.flipped, cache.stale, cache.foreign):
        assert path.exists()


def _has_stamp(path: Path) -> bool:
    return STAMP_XATTR in os.listxattr(path)


# ---------------------------------------------------------------------------------------------------- prune


def test_prune_older_than(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    age(cache.good, atime_days=10)
    age(cache.good512, atime_days=1)
    code, out, _ = run(capsys, "cache", "prune", "--older-than", "2d", str(cache.root))
    assert code == 0
    assert not cache.good.exists() and cache.good512.exists()
    assert not cache.stale.exists()  # an unlocked partial not written for 3 days (its mtime)
    assert cache.locked.exists()  # 30 days old, but a download holds its lock
    assert f"{cache.locked}: download in progress: kept" in out
    assert f"{cache.good}: removed (5000 bytes): unused for 10.0d" in out
    assert out.splitlines()[-1].startswith("2 removed, freed 5011 bytes")
    cache.assert_outside_untouched()
    assert cache.foreign.exists()


def test_prune_max_size_evicts_least_recently_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blobs = [put_blob(tmp_path, bytes([i]) * 1000) for i in range(4)]
    for days, blob in zip((1, 4, 2, 3), blobs, strict=True):
        age(blob, atime_days=days)
    code, out, _ = run(capsys, "cache", "prune", "--max-size", "2000", "--json", str(tmp_path))
    report = json.loads(out)
    assert code == 0
    assert [r["path"] for r in report["removals"]] == [str(blobs[1]), str(blobs[3])]
    assert report["freed_bytes"] == 2000 and report["remaining_bytes"] == 2000
    assert [b.exists() for b in blobs] == [True, False, True, False]


def test_prune_dry_run_removes_nothing(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "prune", "-n", "--max-size", "0", str(cache.root))
    assert code == 0
    assert "would be removed" in out and "would free" in out and "still over 0 bytes" in out
    for path in (cache.good, cache.good512, cache.truncated, cache.flipped, cache.stale, cache.idle, cache.locked):
        assert path.exists()


def test_prune_needs_a_criterion(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cache", "prune", str(clean))
    assert code == 2 and "--older-than" in err


# ---------------------------------------------------------------------------------------------------- du


def test_du(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "du", "--json", str(cache.root))
    usage = json.loads(out)
    assert code == 0
    assert usage["algorithms"]["sha256"] == {"blobs": 3, "blob_bytes": 18000, "partials": 3, "partial_bytes": 31}
    assert usage["algorithms"]["sha512"] == {"blobs": 1, "blob_bytes": 11, "partials": 0, "partial_bytes": 0}
    assert usage["total"] == {"blobs": 4, "blob_bytes": 18011, "partials": 3, "partial_bytes": 31}
    assert usage["foreign"]["count"] == 4

    code, out, _ = run(capsys, "cache", "du", str(cache.root))
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["sha256", "sha512", "total", "foreign"]
    assert "18011 bytes" in out


# ---------------------------------------------------------------------------------------------------- usage


@pytest.mark.parametrize("action", [["verify"], ["du"], ["prune", "--older-than", "1d"]])
def test_bad_dirs(tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "blobs").symlink_to(tmp_path / "empty")
    cases = {
        "give the cache directory": [],
        "No such file or directory": [str(tmp_path / "missing")],
        "not a blob cache": [str(tmp_path / "empty")],
        "symbolic links are not followed": [str(tmp_path / "linked")],
        "name different directories": [str(tmp_path), "--blob-cache", str(tmp_path / "empty")],
    }
    for message, args in cases.items():
        code, out, err = run(capsys, "cache", *action, *args)
        assert code == 2 and message in err and out == ""


def test_bad_duration(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cache", "prune", "--older-than", "soon", str(clean))
    assert code == 2 and "invalid duration 'soon'" in err


@pytest.mark.parametrize(("text", "seconds"), [("7d", 7 * DAY), ("12h", 43200), ("30m", 1800), ("90s", 90), ("5", 5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert cache_command.parse_duration(text) == seconds


def test_parse_duration_rejects() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cache_command.parse_duration("7 days")
