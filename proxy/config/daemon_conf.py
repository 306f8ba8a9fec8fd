"""The daemon's own settings file (TOML): ``--config FILE``, default ``/etc/image-proxy/config.toml``.

Only image-proxy's own settings live here; what skopeo reads (registries.conf, auth files, certs.d) is read
from its usual places. Command-line flags win over the file. A missing default file is no error; a missing
file named with ``--config``, a syntax error, an unknown key or a bad value is a ConfigError naming the file
and the key. Every key is optional::

    [registry]
    connect-timeout = 30          # seconds
    tls-handshake-timeout = 10
    response-header-timeout = 30
    stall-timeout = 30            # no body byte for this long fails the read, and the blob resumes
    max-resumes = 10

    [spawned]                     # image-proxy experimental-image-proxy, as update agents spawn it
    daemon = "/run/image-proxy/image-proxy.sock"  # relay to this daemon (off by default; see proxy/server/relay.py)

    [cache]                       # the blob cache (on by default in daemon mode)
    enabled = true
    dir = "/var/cache/image-proxy"
    max-size = "20G"              # or a number of bytes

    [limits]                      # per connection; 0 means no limit where a limit can be lifted
    open-images = 64
    open-pipes = 64
    requests-per-second = 500
    request-burst = 1000
    max-request-size = 32768      # bytes, 512 to 32768
    concurrent-requests = 32      # requests with ids at work at once
    queued-request-bytes = "4M"   # requests and replies waiting (a client that never reads); over: closed
    worker-threads = 4            # worker threads (file reads, hashing) one connection may hold at once

    [daemon]
    listen = "/run/image-proxy/image-proxy.sock"
    socket-group = "image-proxy"  # name or gid
    socket-mode = "0660"
    allow-uids = [0, "zincati"]   # peers allowed by uid (numbers or user names) ...
    allow-gids = ["image-proxy"]  # ... or by any of their groups; both empty: everyone who can connect
    shutdown-grace = 10           # seconds given to transfers in flight after SIGTERM
    max-connections = 256         # daemon-wide limits; 0 lifts one. Connections in all ...
    max-connections-per-uid = 64  # ... and per user
    open-images-per-uid = 256     # images and pipes one user holds over all its connections
    open-pipes-per-uid = 256
    queued-request-bytes = "64M"  # requests and replies waiting, all connections together
    metrics-listen = "127.0.0.1:9464"  # Prometheus GET /metrics there (off by default; HOST:PORT, [::1]:PORT)
    metrics-textfile = "/var/lib/prometheus/node-exporter/image-proxy.prom"  # for node_exporter (off by default)
    metrics-textfile-interval = 15     # seconds between two writes of the textfile
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from proxy.common import jsonlimits

from .errors import ConfigError
from .settings_file import DEFAULT_PATH

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:9464``, ``[::1]:9464``, ``localhost:9464``: a host (always named: no accidental listening on
    every address; ``0.0.0.0`` or ``[::]`` say so) and a port from 1 to 65535. Raises ValueError saying what is
    accepted."""
    hint = f"invalid address {text!r} (try 127.0.0.1:9464 or [::1]:9464)"
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(hint)
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(hint)
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{hint}: an IPv6 address goes in brackets")
    return host, int(port)


def parse_byte_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T``, ``1000`` (bytes); binary units, an optional trailing ``B`` or ``iB``.
    Raises ValueError with a text that says what is accepted."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"invalid size {text!r} (try 20G, 512M or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@attrs.frozen
class DaemonConfig:
    """Values found in the file (None: not set there)."""

    # [registry]
    connect_timeout: float | None = None
    tls_handshake_timeout: float | None = None
    response_header_timeout: float | None = None
    stall_timeout: float | None = None
    max_resumes: int | None = None
    # [cache]
    cache_enabled: bool | None = None
    cache_dir: str | None = None
    cache_max_size: int | None = None
    # [limits]
    open_images: int | None = None
    open_pipes: int | None = None
    requests_per_second: float | None = None
    request_burst: int | None = None
    max_request_size: int | None = None
    concurrent_requests: int | None = None
    queued_request_bytes: int | None = None
    worker_threads: int | None = None
    # [daemon]
    listen: str | None = None
    socket_group: int | None = None
    socket_mode: int | None = None
    allow_uids: frozenset[int] | None = None
    allow_gids: frozenset[int] | None = None
    shutdown_grace: float | None = None
    max_connections: int | None = None
    max_connections_per_uid: int | None = None
    open_images_per_uid: int | None = None
    open_pipes_per_uid: int | None = None
    daemon_queued_request_bytes: int | None = None
    metrics_listen: tuple[str, int] | None = None
    metrics_textfile: str | None = None
    metrics_textfile_interval: float | None = None
    # [spawned]
    spawned_daemon: str | None = None
    path: Path | None = None


class _Reader:
    """Checks values of one section, with errors that name the file, the section and the key."""

    def __init__(self, path: Path, section: str) -> None:
        self.path = path
        self.section = section

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.section}] {key} {what}", self.path)

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, not {value!r}")
        return value

    def seconds(self, key: str, value: Any) -> float:
        value = self.number(key, value)
        if not 0 < value < float("inf"):
            raise self.fail(key, f"must be a positive number of seconds, not {value!r}")
        return float(value)

    def seconds_or_zero(self, key: str, value: Any) -> float:
        value = self.number(key, value)
        if not 0 <= value < float("inf"):
            raise self.fail(key, f"must be a number of seconds (0 or more), not {value!r}")
        return float(value)

    def count(self, key: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.number(key, value)
        if not isinstance(value, int):
            raise self.fail(key, f"must be a whole number, not {value!r}")
        if value < minimum:
            raise self.fail(key, "must not be negative" if minimum == 0 else f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be at most {maximum}, not {value}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, not {value!r}")
        return value

    def size(self, key: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                return parse_byte_size(value)
            except ValueError as e:
                raise self.fail(key, f"is an {e}") from None
        return self.count(key, value)

    def mode(self, key: str, value: Any) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
            raise self.fail(key, f'must be an octal mode in a string such as "0660", not {value!r}')
        return int(value, 8)

    def _id(self, key: str, value: Any, lookup: Callable[[str], int], kind: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value:
            try:
                return lookup(value)
            except KeyError:
                raise self.fail(key, f"names {kind} {value!r}, which does not exist on this system") from None
        raise self.fail(key, f"must hold {kind} names or numbers, not {value!r}")

    def host_port(self, key: str, value: Any) -> tuple[str, int]:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string HOST:PORT, not {value!r}")
        try:
            return parse_host_port(value)
        except ValueError as e:
            raise self.fail(key, f"is an {e}") from None

    def group(self, key: str, value: Any) -> int:
        return self._id(key, value, lambda name: grp.getgrnam(name).gr_gid, "a group")

    def ids(self, key: str, value: Any, kind: str) -> frozenset[int]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, not {value!r}")
        if kind == "user":
            return frozenset(self._id(key, v, lambda name: pwd.getpwnam(name).pw_uid, "a user") for v in value)
        return frozenset(self.group(key, v) for v in value)


#: section → key → (field name, how to read it)
_SCHEMA: dict[str, dict[str, tuple[str, Callable[[_Reader, str, Any], Any]]]] = {
    "registry": {
        "connect-timeout": ("connect_timeout", _Reader.seconds),
        "tls-handshake-timeout": ("tls_handshake_timeout", _Reader.seconds),
        "response-header-timeout": ("response_header_timeout", _Reader.seconds),
        "stall-timeout": ("stall_timeout", _Reader.seconds),
        "max-resumes": ("max_resumes", _Reader.count),
    },
    "spawned": {
        "daemon": ("spawned_daemon", _Reader.text),
    },
    "cache": {
        "enabled": ("cache_enabled", _Reader.boolean),
        "dir": ("cache_dir", _Reader.text),
        "max-size": ("cache_max_size", _Reader.size),
    },
    "limits": {
        "open-images": ("open_images", _Reader.count),
        "open-pipes": ("open_pipes", _Reader.count),
        "requests-per-second": ("requests_per_second", _Reader.seconds_or_zero),
        "request-burst": ("request_burst", lambda r, k, v: r.count(k, v, minimum=1)),
        "max-request-size": ("max_request_size", lambda r, k, v: r.count(k, v, minimum=512, maximum=32768)),
        "concurrent-requests": ("concurrent_requests", lambda r, k, v: r.count(k, v, minimum=1)),
        "queued-request-bytes": ("queued_request_bytes", _Reader.size),
        "worker-threads": ("worker_threads", lambda r, k, v: r.count(k, v, minimum=1, maximum=40)),
    },
    "daemon": {
        "listen": ("listen", _Reader.text),
        "socket-group": ("socket_group", _Reader.group),
        "socket-mode": ("socket_mode", _Reader.mode),
        "allow-uids": ("allow_uids", lambda r, k, v: r.ids(k, v, "user")),
        "allow-gids": ("allow_gids", lambda r, k, v: r.ids(k, v, "group")),
        "shutdown-grace": ("shutdown_grace", _Reader.seconds_or_zero),
        "max-connections": ("max_connections", _Reader.count),
        "max-connections-per-uid": ("max_connections_per_uid", _Reader.count),
        "open-images-per-uid": ("open_images_per_uid", _Reader.count),
        "open-pipes-per-uid": ("open_pipes_per_uid", _Reader.count),
        "queued-request-bytes": ("daemon_queued_request_bytes", _Reader.size),
        "metrics-listen": ("metrics_listen", _Reader.host_port),
        "metrics-textfile": ("metrics_textfile", _Reader.text),
        "metrics-textfile-interval": ("metrics_textfile_interval", _Reader.seconds),
    },
}


def parse_daemon_conf(text: str, path: Path) -> DaemonConfig:
    try:
        doc = jsonlimits.toml_loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", path) from None
    except jsonlimits.NestingError as e:
        raise ConfigError(f"{path}: {e}", path) from None
    unknown = sorted(set(doc) - set(_SCHEMA))
    if unknown:
        raise ConfigError(f"{path}: unknown section or key {unknown[0]!r}", path)
    values: dict[str, Any] = {}
    for section, keys in _SCHEMA.items():
        table: Mapping[str, Any] = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table", path)
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(f"{path}: unknown key [{section}] {unknown[0]!r}", path)
        reader = _Reader(path, section)
        for key, value in table.items():
            field, read = keys[key]
            values[field] = read(reader, key, value)
    return DaemonConfig(**values, path=path)


def load_daemon_conf(path: str | os.PathLike[str] | None = None) -> DaemonConfig:
    """The settings file: ``path`` (must exist) or the default (may be missing)."""
    target = Path(path or DEFAULT_PATH)
    try:
        text = target.read_text()
    except FileNotFoundError:
        if path:
            raise ConfigError(f"{target}: no such file", target) from None
        return DaemonConfig()
    except OSError as e:
        raise ConfigError(f"{target}: cannot read it: {e.strerror}", target) from None
    return parse_daemon_conf(text, target)
