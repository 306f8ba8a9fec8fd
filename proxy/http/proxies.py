"""HTTP proxies from the environment, and CONNECT tunnels through them.

The rules follow Go's ``golang.org/x/net/http/httpproxy`` (what skopeo and podman use), so the daemon picks the
same proxy they would on the same host:

- ``HTTPS_PROXY`` for https URLs, ``HTTP_PROXY`` for http URLs; the upper-case name wins over the lower-case one.
- a proxy URL without a scheme means ``http://``; ``user:password@`` becomes ``Proxy-Authorization: Basic``.
- ``NO_PROXY``: comma-separated; ``*`` disables proxying; ``example.com`` matches the host and its subdomains;
  ``.example.com`` (or ``*.example.com``) only subdomains; ``host:port`` only that port; IP addresses and CIDR
  blocks match IP hosts.
- ``localhost`` and loopback addresses never go through a proxy (unless ``proxy_loopback`` is set, for tests).

Only ``http://`` proxies are supported; other schemes raise :class:`ProxyConfigError` when a request needs them.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping

import attrs
import h11
import trio

from .errors import (
    ConnectionLost,
    HTTPTimeoutError,
    Phase,
    ProtocolError,
    ProxyConfigError,
    ProxyTunnelError,
    format_authority,
)
from .timeouts import Timeouts
from .url import Origin


@attrs.frozen
class ProxyURL:
    """An HTTP proxy: where to connect, and the Proxy-Authorization value if it needs one."""

    host: str
    port: int
    authorization: str | None = attrs.field(default=None, repr=False)

    @property
    def label(self) -> str:
        return format_authority(self.host, self.port)

    @classmethod
    def parse(cls, text: str) -> ProxyURL:
        raw = text.strip()
        if "://" not in raw:
            raw = "http://" + raw
        try:
            parts = urllib.parse.urlsplit(raw)
            port = parts.port
        except ValueError as e:
            raise ProxyConfigError(f"invalid proxy URL {text!r}: {e}") from e
        if parts.scheme.lower() != "http":
            raise ProxyConfigError(f"unsupported proxy URL {text!r}: only http:// proxies are supported")
        if not parts.hostname:
            raise ProxyConfigError(f"invalid proxy URL {text!r}: no host")
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            authorization = f"Basic {token}"
        return cls(parts.hostname.lower(), port if port is not None else 80, authorization)


def _getenv(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name.upper()) or environ.get(name.lower()) or ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host_port(entry: str) -> tuple[str, str]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port or "")."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, ""


@attrs.frozen
class NoProxy:
    """A parsed ``NO_PROXY`` value."""

    everything: bool = False
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    addresses: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str], ...] = ()
    # (suffix with a leading dot, the bare host also matches, port or "")
    domains: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        networks = []
        addresses = []
        domains = []
        for raw in value.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            if "/" in entry:
                with contextlib.suppress(ValueError):
                    networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            host, port = _split_host_port(entry)
            try:
                addresses.append((ipaddress.ip_address(host), port))
                continue
            except ValueError:
                pass
            if host.startswith("*."):
                host = host[1:]
            match_bare = not host.startswith(".")
            suffix = host if host.startswith(".") else "." + host
            if suffix != ".":
                domains.append((suffix, match_bare, port))
        return cls(False, tuple(networks), tuple(addresses), tuple(domains))

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        port_text = str(port)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            if any(ip in network for network in self.networks):
                return True
            return any(ip == address and p in ("", port_text) for address, p in self.addresses)
        for suffix, match_bare, p in self.domains:
            if (host.endswith(suffix) or (match_bare and host == suffix[1:])) and p in ("", port_text):
                return True
        return False


@attrs.frozen
class ProxyConfig:
    """Which proxy (if any) each origin goes through."""

    http_proxy: str = ""
    https_proxy: str = ""
    no_proxy: NoProxy = NoProxy()
    #: proxy loopback destinations too (Go never does; tests need it)
    proxy_loopback: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, proxy_loopback: bool = False) -> ProxyConfig:
        env = os.environ if environ is None else environ
        return cls(
            http_proxy=_getenv(env, "http_proxy"),
            https_proxy=_getenv(env, "https_proxy"),
            no_proxy=NoProxy.parse(_getenv(env, "no_proxy")),
            proxy_loopback=proxy_loopback,
        )

    def proxy_for(self, origin: Origin) -> ProxyURL | None:
        """The proxy for ``origin``, or None to connect directly. Raises :class:`ProxyConfigError` if the
        applicable proxy setting is unusable."""
        raw = self.https_proxy if origin.scheme == "https" else self.http_proxy
        if not raw:
            return None
        if not self.proxy_loopback and _is_loopback(origin.host):
            return None
        if self.no_proxy.matches(origin.host, origin.port):
            return None
        return ProxyURL.parse(raw)


async def open_tunnel(stream: trio.abc.Stream, host: str, port: int, proxy: ProxyURL, timeouts: Timeouts) -> None:
    """Ask the proxy on ``stream`` for a tunnel to ``host:port`` (deadline: ``timeouts.connect``).
    On return, ``stream`` carries bytes to and from ``host:port``."""
    authority = format_authority(host, port)
    headers = [("Host", authority)]
    if proxy.authorization:
        headers.append(("Proxy-Authorization", proxy.authorization))
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method="CONNECT", target=authority, headers=headers)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    with trio.move_on_after(timeouts.connect):
        try:
            await stream.send_all(data)
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    raise ProtocolError(host, port, Phase.CONNECT, e) from e
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16384))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    break
                raise ConnectionLost(host, port, Phase.CONNECT, EOFError(f"proxy {proxy.label} closed the connection"))
        except trio.BrokenResourceError as e:
            raise ConnectionLost(host, port, Phase.CONNECT, e.__cause__ or e) from e
        if not 200 <= event.status_code < 300:
            raise ProxyTunnelError(host, port, proxy.label, event.status_code, event.reason.decode("latin-1"))
        leftover, _closed = conn.trailing_data
        if leftover:
            raise ProtocolError(host, port, Phase.CONNECT, ValueError("proxy sent data after its CONNECT answer"))
        return
    raise HTTPTimeoutError(host, port, Phase.CONNECT, timeouts.connect, f" (CONNECT through proxy {proxy.label})")
