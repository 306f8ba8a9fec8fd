"""Streaming a blob-cache file once into a pipe: the bytes arrive whole, and what was sent leaves the page cache a
little behind the reader (a 1 GiB layer does not take 1 GiB of the machine's memory); a file that is not
``read_once`` (a user's layout) keeps its pages."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import trio

from proxy.common import page_cache
from proxy.common.pipes import open_pipe, splice_file
from tests.support.pagecache import resident_pages

MiB = 1 << 20
SIZE = 4 * page_cache.DROP_LAG + 3 * MiB + 123


@pytest.fixture
def blob_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "blob"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages: the only ones a drop can drop
    finally:
        os.close(fd)
    return path, data


async def stream(path: Path, *, read_once: bool) -> bytes:
    read_fd, write_fd = open_pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(read_fd, MiB):
            got.extend(chunk)

    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, drain)
            writer = trio.lowlevel.FdStream(write_fd)
            async with writer:
                reached = await splice_file(fd, SIZE, writer, read_once=read_once)
        assert reached == SIZE
    finally:
        os.close(fd)
        os.close(read_fd)
    return bytes(got)


async def test_a_file_streamed_once_leaves_the_page_cache_behind_the_reader(blob_file) -> None:
    path, data = blob_file
    with trio.fail_after(30):
        assert await stream(path, read_once=True) == data
    resident = resident_pages(path)
    lag_pages = page_cache.DROP_LAG // page_cache.PAGE_SIZE
    assert not any(resident[:lag_pages]), "the first bytes sent, far behind the end, were dropped"
    assert any(resident[-lag_pages:]), "the last DROP_LAG bytes stay (the reader may still hold them)"


async def test_a_file_not_read_once_keeps_its_pages(blob_file) -> None:
    path, data = blob_file
    with trio.fail_after(30):
        assert await stream(path, read_once=False) == data
    assert all(resident_pages(path)), "a user's file keeps its page cache"


def test_drop_behind_drops_in_steps_what_lies_a_lag_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(page_cache, "drop_cached", lambda fd, offset, length: calls.append((offset, length)))
    lag = page_cache.DROP_LAG
    behind = page_cache.DropBehind(3, start=100)
    for offset in range(100, 100 + 5 * lag, MiB):
        behind.reached(offset)
    page = page_cache.PAGE_SIZE
    first_end = (100 + 2 * lag - lag) // page * page  # the first offset at which lag bytes lie a lag behind
    assert calls[0][0] == 100 and calls[0][0] + calls[0][1] >= first_end - MiB
    assert all(length >= lag for _, length in calls)
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls)), "contiguous steps"
    assert calls[-1][0] + calls[-1][1] <= 100 + 5 * lag - lag, "never within a lag of the reader"
