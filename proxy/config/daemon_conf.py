"""The daemon's own settings file (TOML): ``--config FILE``, default ``/etc/image-proxy/config.toml``.

Only the daemon's settings live here; what skopeo reads (registries.conf, auth files, certs.d) is read
from its usual places. Command-line flags win over the file. A missing default file is no error; a missing
file named with ``--config``, a syntax error, an unknown key or a bad value is a ConfigError naming the file
and the key. Keys (all optional)::

    [registry]
    connect-timeout = 30          # seconds
    tls-handshake-timeout = 10
    response-header-timeout = 30
    stall-timeout = 30            # no body byte for this long fails the read, and the blob resumes
    max-resumes = 10
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError

DEFAULT_PATH = Path("/etc/image-proxy/config.toml")

_SECONDS = ("connect-timeout", "tls-handshake-timeout", "response-header-timeout", "stall-timeout")
_COUNTS = ("max-resumes",)


@attrs.frozen
class DaemonConfig:
    """Values found in the file (None: not set there)."""

    connect_timeout: float | None = None
    tls_handshake_timeout: float | None = None
    response_header_timeout: float | None = None
    stall_timeout: float | None = None
    max_resumes: int | None = None
    path: Path | None = None


def _number(path: Path, key: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: [registry] {key} must be a number, not {value!r}", path)
    if integer and not isinstance(value, int):
        raise ConfigError(f"{path}: [registry] {key} must be a whole number, not {value!r}", path)
    if integer and value < 0:
        raise ConfigError(f"{path}: [registry] {key} must not be negative, not {value!r}", path)
    if not integer and not 0 < value < float("inf"):
        raise ConfigError(f"{path}: [registry] {key} must be a positive number of seconds, not {value!r}", path)
    return value


def parse_daemon_conf(text: str, path: Path) -> DaemonConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", path) from None
    unknown = sorted(set(doc) - {"registry"})
    if unknown:
        raise ConfigError(f"{path}: unknown section or key {unknown[0]!r}", path)
    registry: Mapping[str, Any] = doc.get("registry", {})
    if not isinstance(registry, dict):
        raise ConfigError(f"{path}: [registry] must be a table", path)
    unknown = sorted(set(registry) - {*_SECONDS, *_COUNTS})
    if unknown:
        raise ConfigError(f"{path}: unknown key [registry] {unknown[0]!r}", path)
    values = {key.replace("-", "_"): _number(path, key, registry[key], key in _COUNTS) for key in registry}
    return DaemonConfig(**values, path=path)


def load_daemon_conf(path: str | os.PathLike[str] | None = None) -> DaemonConfig:
    """The settings file: ``path`` (must exist) or the default (may be missing)."""
    target = Path(path) if path else DEFAULT_PATH
    try:
        text = target.read_text()
    except FileNotFoundError:
        if path:
            raise ConfigError(f"{target}: no such file", target) from None
        return DaemonConfig()
    except OSError as e:
        raise ConfigError(f"{target}: cannot read it: {e.strerror}", target) from None
    return parse_daemon_conf(text, target)
