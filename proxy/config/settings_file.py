"""Where image-proxy's own settings file is, and the one setting a spawned proxy reads before anything else.

The file is read and checked whole by :mod:`proxy.config.daemon_conf`. A spawned proxy first needs only to know
whether it relays its client to the daemon (``[spawned] daemon``, see :mod:`proxy.server.relay`); reading that
with ``tomllib`` alone keeps a relay's start-up free of the settings machinery (attrs classes, the registries.conf
and auth-file readers) that it never uses.
"""

from __future__ import annotations

import os

from proxy.common import jsonlimits

DEFAULT_PATH = "/etc/image-proxy/config.toml"


def relay_socket(path: str | os.PathLike[str] | None = None) -> str | None:
    """``[spawned] daemon`` of the settings file ``path`` (default :data:`DEFAULT_PATH`); None when it is not set,
    or when the file is missing, unreadable or not TOML: the proxy then serves the client itself, and the full
    reader it uses for that says what is wrong. A relay checks nothing else of the file: its other sections are
    the daemon's (which checks them at its start) or apply only to a proxy that serves the client itself."""
    try:
        with open(path or DEFAULT_PATH, encoding="utf-8") as file:  # no pathlib: 3.5 ms of a relay's start-up
            text = file.read()
        document = jsonlimits.toml_loads(text)
    except (OSError, ValueError, UnicodeDecodeError):  # tomllib.TOMLDecodeError and NestingError are ValueErrors
        return None
    spawned = document.get("spawned")
    value = spawned.get("daemon") if isinstance(spawned, dict) else None
    return value if isinstance(value, str) and value else None


__all__ = ["DEFAULT_PATH", "relay_socket"]
