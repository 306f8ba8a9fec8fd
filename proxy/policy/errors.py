"""The errors of signature policy: a policy file that cannot be used, and an image the policy refuses."""

from __future__ import annotations

from protocol.errors import ErrorCode, ProxyError
from proxy.config.errors import ConfigError


class PolicyFileError(ConfigError):
    """policy.json (or a registries.d file) cannot be used: the text names the file and the key."""


class PolicyRejected(ProxyError):
    """The policy refuses the image; the text names the image, the scope that matched and why."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.OTHER) -> None:
        super().__init__(message, code)


class InvalidSignature(Exception):
    """One signature does not satisfy a requirement (the image may still have another that does)."""
