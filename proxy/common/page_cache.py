"""Dropping the bytes of a file that were read (or written) once from the page cache.

A blob is streamed once per pull: left in the page cache, a 1 GiB layer takes 1 GiB of memory from the machine's
working set, and every page of it is memory taken fresh from the free lists. On a virtual machine whose free
memory goes back to the host (free page reporting, virtio-balloon: the machine the benches ran on) a fresh page
costs a fault in the host, and reading or writing 1 GiB through new page cache took from 0.1 to 2.5 CPU s,
depending on which pages the kernel handed out. Dropping what was streamed, a few MiB behind, makes the next
chunks reuse those pages: the cost is the disk's, not the allocator's.
"""

from __future__ import annotations

import contextlib
import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: a streaming reader drops what lies this far behind its position (more than any pipe holds: pages still in
#: a pipe cannot be dropped anyway), in steps of this size
DROP_LAG = 16 << 20


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the clean pages of ``fd`` in the range from the page cache (best effort: only advice)."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class DropBehind:
    """What of a file streamed once from ``start`` on was dropped from the page cache. A reader calls
    :meth:`reached` after each read: what lies :data:`DROP_LAG` behind is dropped, in steps of :data:`DROP_LAG`;
    a writer calls :meth:`drop_to` with what may go (see ``proxy.cache.writeback``)."""

    def __init__(self, fd: int, start: int) -> None:
        self._fd = fd
        self._dropped = start

    def reached(self, offset: int) -> None:
        limit = (offset - DROP_LAG) // PAGE_SIZE * PAGE_SIZE
        if limit - self._dropped >= DROP_LAG:
            self.drop_to(limit)

    def drop_to(self, offset: int) -> None:
        """Drop the whole pages from where the last drop ended up to ``offset``."""
        limit = offset // PAGE_SIZE * PAGE_SIZE
        if limit > self._dropped:
            drop_cached(self._fd, self._dropped, limit - self._dropped)
            self._dropped = limit


__all__ = ["DROP_LAG", "PAGE_SIZE", "DropBehind", "drop_cached"]
