"""The running size and digest of a byte stream, checked the way clients expect (the Go server's texts)."""

from __future__ import annotations

import hashlib

from protocol.errors import ProxyError


def size_mismatch(expected: int, got: int) -> ProxyError:
    """FinishPipe's error when a blob is not the size the client asked for (Go's text)."""
    return ProxyError(f"expected {expected} bytes in blob, got {got}")


def digest_mismatch(digest: str) -> ProxyError:
    """FinishPipe's error when a blob's bytes do not match its digest (Go's text)."""
    return ProxyError(f"corrupted blob, expecting {digest}")


class DigestVerifier:
    """Running size and digest of a byte stream, checked against what the client expects."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        algo, _, self._hex = digest.partition(":")
        self._hash = hashlib.new(algo)
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def matches(self) -> bool:
        return self._hash.hexdigest() == self._hex

    def check(self, expected_size: int | None) -> ProxyError | None:
        """The error FinishPipe reports (the digest's wins, as in Go), or None."""
        if not self.matches():
            return digest_mismatch(self.digest)
        if expected_size is not None and self.size != expected_size:
            return size_mismatch(expected_size, self.size)
        return None


__all__ = ["DigestVerifier", "digest_mismatch", "size_mismatch"]
