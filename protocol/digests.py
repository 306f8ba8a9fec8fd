"""Digests, written once: which the protocol accepts (sha256 and sha512, lowercase hex of their exact lengths),
the text of a bad one, the digest of some bytes, and a running check of a stream against one. Pure (hashlib)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from protocol.errors import ProtocolViolation, ProxyError, digest_mismatch, size_mismatch

#: the algorithms accepted, with the length of their hex
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_VALID = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
#: the OCI digest grammar, to say what is wrong with one that is not accepted
_GRAMMAR = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_HEX = re.compile(r"^[a-f0-9]+$")


def is_valid_digest(value: object) -> bool:
    """``sha256:<64 hex>`` or ``sha512:<128 hex>``, lowercase, nothing else."""
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def parse_digest(value: Any) -> str:
    """A digest a client sent; ProtocolViolation with a text saying what is wrong (as containers/image's)."""
    from protocol.codec import json_type_name, shown

    if not isinstance(value, str):
        raise ProtocolViolation(f"expecting string blobid, not {json_type_name(value)}")
    quoted = shown(value)
    m = _GRAMMAR.match(value)
    if m is None:
        raise ProtocolViolation(f"invalid digest {quoted}: invalid checksum digest format")
    algo, hexpart = m.groups()
    if algo not in DIGEST_HEX_LENGTHS:
        raise ProtocolViolation(f"invalid digest {quoted}: unsupported digest algorithm {algo!r}")
    if not _HEX.match(hexpart):
        raise ProtocolViolation(f"invalid digest {quoted}: invalid checksum digest format")
    if len(hexpart) != DIGEST_HEX_LENGTHS[algo]:
        raise ProtocolViolation(
            f"invalid digest {quoted}: invalid checksum digest length "
            f"(expected {DIGEST_HEX_LENGTHS[algo]} hex digits for {algo}, got {len(hexpart)})"
        )
    return value


def digest_of(data: bytes | memoryview, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


class DigestVerifier:
    """Running size and digest of a byte stream, checked against what is expected (the Go server's texts)."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        algo, _, self._hex = digest.partition(":")
        self._hash = hashlib.new(algo)
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def actual(self) -> str:
        """The digest of what came so far."""
        return f"{self.digest.partition(':')[0]}:{self._hash.hexdigest()}"

    def matches(self) -> bool:
        return self._hash.hexdigest() == self._hex

    def check(self, expected_size: int | None) -> ProxyError | None:
        """The error FinishPipe reports (the digest's wins, as in Go), or None."""
        if not self.matches():
            return digest_mismatch(self.digest)
        if expected_size is not None and self.size != expected_size:
            return size_mismatch(expected_size, self.size)
        return None


__all__ = ["DIGEST_HEX_LENGTHS", "DigestVerifier", "digest_of", "is_valid_digest", "parse_digest"]
