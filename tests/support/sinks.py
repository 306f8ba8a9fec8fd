"""Blob writers for ``protocol.client.pull.pull`` in tests."""

from __future__ import annotations


class Discard:
    """A blob writer that keeps nothing: the client bindings check each blob's size (and, with ``verify``, its
    digest) as the bytes pass, and the server checked the digest before FinishPipe succeeded."""

    def write(self, chunk: bytes) -> None:
        pass

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


def discard_all(blob: object) -> Discard:
    """``sinks`` for pull: every blob fetched and dropped."""
    return Discard()
