"""Errors of the HTTP client: where it failed (host, port, phase), why (cause), and whether to retry.

These are the HTTP client's own errors (it knows nothing of the image-proxy protocol): the registry layer turns
them into the errors clients see, with ``retryable`` deciding the reply's ``retryable`` code.
"""

from __future__ import annotations

import enum
import socket
import ssl
from collections.abc import Sequence


class Phase(enum.StrEnum):
    """The part of an exchange that failed."""

    CONNECT = "connect"  # DNS, TCP connect, proxy CONNECT
    TLS = "tls"  # TLS handshake
    HEADERS = "headers"  # sending the request, waiting for and parsing the response headers
    BODY = "body"  # reading the response body


_PERMANENT_DNS_ERRORS = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_SERVICE") if hasattr(socket, name)
)


def _connect_attempts(cause: BaseException | None) -> list[BaseException]:
    """The errors of each address tried: trio's open_tcp_stream raises one OSError ("all attempts to connect to
    ... failed") whose ``__cause__`` groups them."""
    group = cause.__cause__ if cause is not None else None
    if isinstance(group, BaseExceptionGroup):
        return list(group.exceptions)
    return [cause] if cause is not None else []


def _all_refused(cause: BaseException | None) -> bool:
    attempts = _connect_attempts(cause)
    return bool(attempts) and all(isinstance(e, ConnectionRefusedError) for e in attempts)


def _describe(cause: BaseException | None) -> str:
    if cause is None:
        return ""
    if _all_refused(cause):
        return ": connection refused"
    text = str(cause) or type(cause).__name__
    return f": {text}"


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HTTPError(Exception):
    """Base class: something failed while talking to ``host:port``.

    ``retryable`` says whether the same request may succeed if tried again (on a new connection).
    """

    #: the default for the class; subclasses and instances may decide differently
    default_retryable = False

    def __init__(
        self,
        message: str,
        *,
        host: str = "",
        port: int = 0,
        phase: Phase | None = None,
        cause: BaseException | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.phase = phase
        self.cause = cause
        self._retryable = self.default_retryable if retryable is None else retryable
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self)

    @property
    def retryable(self) -> bool:
        return self._retryable

    @property
    def authority(self) -> str:
        return format_authority(self.host, self.port) if self.host else ""


class InvalidURL(HTTPError):
    """A URL the client cannot use (bad syntax, unsupported scheme)."""


class ConnectError(HTTPError):
    """The TCP connection (or the proxy tunnel) could not be established: refused, unreachable, DNS.

    Retryable, except when DNS says the name does not exist (a typo will not fix itself; a DNS outage, EAI_AGAIN,
    may)."""

    default_retryable = True

    def __init__(self, host: str, port: int, cause: BaseException | None, *, via: str = "") -> None:
        where = format_authority(host, port) + (f" via proxy {via}" if via else "")
        unknown_name = isinstance(cause, socket.gaierror) and cause.errno in _PERMANENT_DNS_ERRORS
        super().__init__(
            f"cannot connect to {where}{_describe(cause)}",
            host=host,
            port=port,
            phase=Phase.CONNECT,
            cause=cause,
            retryable=not unknown_name,
        )

    @property
    def refused(self) -> bool:
        """The host answered, and refused the connection (nothing listens on that port): trying again at once
        gets the same answer."""
        return _all_refused(self.cause)


class TLSError(HTTPError):
    """The TLS handshake failed. Certificate verification failures are not retryable; a dropped handshake is."""

    def __init__(self, host: str, port: int, cause: BaseException | None) -> None:
        verification = isinstance(cause, ssl.SSLCertVerificationError)
        retryable = not isinstance(cause, ssl.SSLError) or isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError)
        what = "TLS certificate verification failed" if verification else "TLS handshake failed"
        super().__init__(
            f"{what} for {format_authority(host, port)}{_describe(cause)}",
            host=host,
            port=port,
            phase=Phase.TLS,
            cause=cause,
            retryable=retryable and not verification,
        )
        self.verification_failed = verification


class HTTPTimeoutError(HTTPError):
    """A phase's deadline passed (connect, TLS handshake, response headers)."""

    default_retryable = True

    def __init__(self, host: str, port: int, phase: Phase, seconds: float, detail: str = "") -> None:
        what = {
            Phase.CONNECT: "connecting",
            Phase.TLS: "the TLS handshake",
            Phase.HEADERS: "the response headers",
            Phase.BODY: "the response body",
        }[phase]
        super().__init__(
            f"timed out after {seconds:g} s waiting for {what} from {format_authority(host, port)}{detail}",
            host=host,
            port=port,
            phase=phase,
        )
        self.seconds = seconds


class StallError(HTTPTimeoutError):
    """No body byte arrived for ``seconds``; ``received`` body bytes had arrived before."""

    def __init__(self, host: str, port: int, seconds: float, received: int, expected: int | None) -> None:
        of = f" of {expected}" if expected is not None else ""
        super().__init__(host, port, Phase.BODY, seconds, f" (stalled: no data after {received}{of} body bytes)")
        self.received = received
        self.expected = expected


class ConnectionLost(HTTPError):
    """The server closed or reset the connection before the response was complete."""

    default_retryable = True

    def __init__(
        self,
        host: str,
        port: int,
        phase: Phase,
        cause: BaseException | None = None,
        *,
        received: int = 0,
        expected: int | None = None,
    ) -> None:
        if phase is Phase.BODY:
            of = f" of {expected}" if expected is not None else ""
            what = f"connection to {format_authority(host, port)} lost after {received}{of} body bytes"
        else:
            what = f"connection to {format_authority(host, port)} lost before the response headers"
        super().__init__(what + _describe(cause), host=host, port=port, phase=phase, cause=cause)
        self.received = received
        self.expected = expected


class ProtocolError(HTTPError):
    """The server sent something that is not HTTP/1.1 (or we were asked to send something invalid)."""

    def __init__(self, host: str, port: int, phase: Phase, cause: BaseException | None) -> None:
        super().__init__(
            f"HTTP protocol error with {format_authority(host, port)} ({phase}){_describe(cause)}",
            host=host,
            port=port,
            phase=phase,
            cause=cause,
        )


class BodyTooLarge(HTTPError):
    """A body read with a size limit was larger than the limit."""

    def __init__(self, host: str, port: int, limit: int, declared: int | None = None) -> None:
        size = f"{declared} bytes" if declared is not None else "more"
        super().__init__(
            f"response body from {format_authority(host, port)} is too large: {size}, limit {limit} bytes",
            host=host,
            port=port,
            phase=Phase.BODY,
        )
        self.limit = limit


class ProxyTunnelError(HTTPError):
    """The HTTP proxy refused the CONNECT tunnel. 502/503/504 from the proxy are retryable."""

    def __init__(self, host: str, port: int, proxy: str, status: int, reason: str) -> None:
        hint = " (proxy authentication required: put user:password in the proxy URL)" if status == 407 else ""
        super().__init__(
            f"proxy {proxy} refused CONNECT to {format_authority(host, port)}: {status} {reason}{hint}",
            host=host,
            port=port,
            phase=Phase.CONNECT,
            retryable=status in (502, 503, 504),
        )
        self.status = status


class ProxyConfigError(HTTPError):
    """``HTTP_PROXY``/``HTTPS_PROXY`` holds something we cannot use."""


class TLSConfigError(HTTPError):
    """A certs directory is unusable (unreadable CA file, a client certificate without its key, ...)."""


class RedirectError(HTTPError):
    """A redirect we refuse to follow: too many hops, a loop, a downgrade to http, a bad Location."""

    def __init__(self, message: str, chain: Sequence[str]) -> None:
        self.chain = tuple(chain)
        super().__init__(f"{message}: {' -> '.join(self.chain)}")
