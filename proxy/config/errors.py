"""The error every configuration reader raises."""

from __future__ import annotations

import os

from protocol.errors import ErrorCode, ProxyError


class ConfigError(ProxyError):
    """A configuration file (or option) that cannot be used: ``path`` names the file when there is one, and the
    message says which file and what is wrong. Never retryable: the same files give the same answer."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message, ErrorCode.OTHER)
        self.path = None if path is None else os.fspath(path)
