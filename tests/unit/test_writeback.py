"""Write-behind of a cache file being filled: the writeback of each STEP started as it is appended, the step
before waited for, and what every reader has read (and is on disk) dropped from the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.cache import writeback
from proxy.common import page_cache
from tests.support.pagecache import resident_pages

STEP = writeback.STEP
MiB = 1 << 20


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int, int]] = []
        monkeypatch.setattr(writeback, "start_writeback", lambda fd, offset, length: self._add("start", offset, length))
        monkeypatch.setattr(writeback, "wait_written", lambda fd, offset, length: self._add("wait", offset, length))
        monkeypatch.setattr(page_cache, "drop_cached", lambda fd, offset, length: self._add("drop", offset, length))

    def _add(self, what: str, offset: int, length: int) -> bool:
        self.calls.append((what, offset, length))
        return True


def append(tracker: writeback.WriteBehind, start: int, end: int) -> None:
    for position in range(start + MiB, end + 1, MiB):
        tracker.wrote(position)


def test_each_step_starts_its_writeback_and_waits_for_the_one_before(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    tracker = writeback.WriteBehind(7, start=0, consumed=lambda: 0)  # nobody has read anything: nothing dropped
    append(tracker, 0, 3 * STEP)
    assert recorder.calls == [
        ("start", 0, STEP),
        ("start", STEP, STEP),
        ("wait", 0, STEP),
        ("start", 2 * STEP, STEP),
        ("wait", STEP, STEP),
    ]


def test_only_what_is_on_disk_and_read_by_every_reader_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    read_up_to = [0]
    tracker = writeback.WriteBehind(7, start=0, consumed=lambda: read_up_to[0])
    append(tracker, 0, 2 * STEP)
    assert [c for c in recorder.calls if c[0] == "drop"] == []  # step 1 is on disk, but nobody read it
    read_up_to[0] = STEP // 2 + 100  # the slowest reader is halfway through step 1 (not on a page boundary)
    append(tracker, 2 * STEP, 3 * STEP)
    assert recorder.calls[-1] == ("drop", 0, STEP // 2)  # the whole pages it has read, no more
    read_up_to[0] = 10 * STEP  # everyone read everything: dropped only up to what is on disk (2 steps)
    append(tracker, 3 * STEP, 4 * STEP)
    assert recorder.calls[-1] == ("drop", STEP // 2, 3 * STEP - STEP // 2)


def test_a_resumed_fill_starts_at_its_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    start = 5 * MiB + 123  # the bytes before were there already (a resumed partial)
    tracker = writeback.WriteBehind(7, start=start, consumed=lambda: 1 << 40)
    tracker.wrote(start + STEP - 1)
    assert recorder.calls == []
    tracker.wrote(start + STEP)
    tracker.wrote(start + 2 * STEP)
    page = os.sysconf("SC_PAGE_SIZE")
    assert recorder.calls == [
        ("start", start, STEP),
        ("start", start + STEP, STEP),
        ("wait", start, STEP),
        ("drop", start, (start + STEP) // page * page - start),
    ]


def test_a_real_file_keeps_in_the_page_cache_only_what_was_not_read(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    page = os.sysconf("SC_PAGE_SIZE")
    read_up_to = STEP + STEP // 2  # the reader is halfway through the second step
    try:
        tracker = writeback.WriteBehind(fd, start=0, consumed=lambda: read_up_to)
        chunk = os.urandom(MiB)
        for offset in range(0, 4 * STEP, MiB):
            os.pwrite(fd, chunk, offset)
            tracker.wrote(offset + MiB)
    finally:
        os.close(fd)
    per_page = resident_pages(path)
    boundary = read_up_to // page
    assert not any(per_page[:boundary]), "pages every reader has read and that are on disk stay cached"
    assert all(per_page[boundary:]), "pages a reader has not read yet were dropped"
    assert path.stat().st_size == 4 * STEP


def test_sync_file_range_is_found_and_accepts_a_dirty_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(MiB))
        assert writeback._load() is not None
        writeback.start_writeback(fd, 0, MiB)  # best effort: must not raise
        assert writeback.wait_written(fd, 0, MiB)
        assert not writeback.wait_written(-1, 0, MiB)  # EBADF: not done, not raised
        page_cache.drop_cached(-1, 0, MiB)  # an error is only advice lost
    finally:
        os.close(fd)
    assert path.stat().st_size == MiB
