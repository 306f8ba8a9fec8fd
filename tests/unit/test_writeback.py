"""Early writeback of a cache file being filled: started every STEP bytes, for the bytes written since."""

from __future__ import annotations

import os

import pytest

from proxy.cache import writeback


def test_writeback_starts_every_step_for_the_bytes_since_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(writeback, "start_writeback", lambda fd, offset, length: calls.append((fd, offset, length)))
    step = writeback.STEP
    tracker = writeback.Writeback(7, start=100)
    for end in range(100 + (1 << 20), 100 + 3 * step + 1, 1 << 20):
        tracker.wrote(end)
    assert calls == [(7, 100, step), (7, 100 + step, step), (7, 100 + 2 * step, step)]


def test_sync_file_range_is_found_and_accepts_a_dirty_file(tmp_path) -> None:
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(1 << 20))
        assert writeback._load() is not None
        writeback.start_writeback(fd, 0, 1 << 20)  # best effort: must not raise
        writeback.start_writeback(-1, 0, 1 << 20)  # EBADF is ignored too
    finally:
        os.close(fd)
    assert path.stat().st_size == 1 << 20
