"""The few URL operations the client needs: parse, origin, request target, resolving a Location."""

from __future__ import annotations

import re
import urllib.parse

import attrs

from .errors import InvalidURL

DEFAULT_PORTS = {"http": 80, "https": 443}

# request targets and hosts must not contain whitespace or control characters (h11 would refuse them later,
# with a less helpful message)
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")


@attrs.frozen
class Origin:
    """Where connections go: the pool's key."""

    scheme: str
    host: str  # lower-case, IPv6 without brackets
    port: int

    @property
    def authority(self) -> str:
        """``host[:port]`` for a Host header: brackets for IPv6, the port only when it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


@attrs.frozen
class URL:
    """An absolute http(s) URL; ``target`` is the origin-form request target (path and query)."""

    scheme: str
    host: str
    port: int
    target: str
    explicit_port: bool = False

    @classmethod
    def parse(cls, text: str) -> URL:
        if _BAD_CHARS.search(text):
            raise InvalidURL(f"invalid URL {text!r}: contains whitespace or control characters")
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise InvalidURL(f"invalid URL {text!r}: {e}") from e
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise InvalidURL(f"invalid URL {text!r}: scheme must be http or https")
        host = (parts.hostname or "").lower()
        if not host:
            raise InvalidURL(f"invalid URL {text!r}: no host")
        if parts.username is not None:
            raise InvalidURL(f"invalid URL {text!r}: credentials in URLs are not supported")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(
            scheme=scheme,
            host=host,
            port=port if port is not None else DEFAULT_PORTS[scheme],
            target=target,
            explicit_port=port is not None,
        )

    @property
    def origin(self) -> Origin:
        return Origin(self.scheme, self.host, self.port)

    @property
    def authority(self) -> str:
        """``host`` or ``host:port`` as written in the URL (certs.d directory names depend on the difference)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host

    def join(self, location: str) -> URL:
        """Resolve a Location header value against this URL (fragments are dropped)."""
        joined, _fragment = urllib.parse.urldefrag(urllib.parse.urljoin(str(self), location))
        return URL.parse(joined)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"
