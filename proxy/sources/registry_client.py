"""Talking to one registry host (distribution API v2): scheme detection, authorization, retries and
honest errors. The image logic (which manifest, which source for a blob) is in ``registry.py``.

Every request goes through :meth:`RegistryClient.get`: it follows redirects (dropping ``Authorization``
when the origin changes), answers a 401 challenge once, and retries what is worth retrying with
full-jitter backoff that honours ``Retry-After`` and counts toward a deadline. What it gives up on becomes
a :class:`RegistryError` whose text names the host and what failed, and whose code is ``retryable``
exactly when trying again later may help.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.http.errors import HTTPError
from proxy.http.pool import ConnectionPool
from proxy.http.redirects import request_following_redirects
from proxy.http.retry import RETRYABLE_STATUSES, RetryPolicy, parse_retry_after
from proxy.http.timeouts import Timeouts
from proxy.http.tls import create_ssl_context
from proxy.http.url import URL

log = logging.getLogger(__name__)

#: the most of an error body we read to explain a failure
MAX_ERROR_BODY = 64 * 1024
#: distribution error codes that mean "this does not exist here"
NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
#: distribution error codes that are final whatever the HTTP status
FINAL_CODES = frozenset({"UNAUTHORIZED", "DENIED", *NOT_FOUND_CODES})


class RegistryError(ProxyError):
    """A registry answered with an error, or could not be reached."""

    def __init__(
        self, message: str, *, status: int | None = None, codes: Sequence[str] = (), retryable: bool = False
    ) -> None:
        super().__init__(message, ErrorCode.RETRYABLE if retryable else ErrorCode.OTHER)
        self.status = status
        self.codes = tuple(codes)

    @property
    def not_found(self) -> bool:
        """An authoritative "does not exist": 404 with a distribution not-found code."""
        return self.status == 404 and any(code in NOT_FOUND_CODES for code in self.codes)


class AuthProvider(Protocol):
    """Turns a registry's 401 challenge into an ``Authorization`` header value (see proxy/http/auth.py)."""

    async def authorization(
        self, pool: ConnectionPool, authority: str, challenge: str, scopes: Sequence[str]
    ) -> str | None: ...

    def invalidate(self, authority: str, scopes: Sequence[str]) -> None: ...

    def has_credentials(self, authority: str) -> bool: ...


@attrs.frozen
class RegistrySettings:
    """How to reach registries: from the command line (and later registries.conf / the daemon config)."""

    #: False: plain HTTP and unverified TLS allowed for every registry (``--tls-verify=false``)
    tls_verify: bool = True
    #: hosts (``host[:port]``) that may use plain HTTP / unverified TLS (registries.conf ``insecure``)
    insecure_hosts: frozenset[str] = frozenset()
    #: ``--cert-dir``: the one certs.d-style directory for every host
    cert_dir: str | None = None
    #: where per-host certs.d directories live, in search order
    certs_d: tuple[str, ...] = ("/etc/containers/certs.d", "/etc/docker/certs.d")
    user_agent: str = "image-proxy/0.1"
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)

    def insecure(self, authority: str) -> bool:
        return not self.tls_verify or authority in self.insecure_hosts

    def cert_dirs(self, authority: str) -> list[str]:
        if self.cert_dir:
            return [self.cert_dir]
        return [f"{base}/{authority}" for base in self.certs_d]


@attrs.define
class _Endpoint:
    """What we learnt about one registry host."""

    scheme: str
    challenge: str | None = None  # the WWW-Authenticate value of the last 401


def _parse_errors(body: bytes) -> list[dict]:
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def describe_failure(status: int, reason: str, body: bytes) -> tuple[str, list[str]]:
    """``"404 Not Found: manifest unknown"`` and the distribution error codes of a failed response."""
    errors = _parse_errors(body)
    codes = [str(e.get("code", "")) for e in errors if e.get("code")]
    details = "; ".join(
        f"{str(e.get('code', '')).lower().replace('_', ' ')}: {e.get('message', '')}".strip(": ") for e in errors
    )
    text = f"{status} {reason}".strip()
    if details:
        text += f": {details}"
    elif body and not errors:
        snippet = body[:200].decode("utf-8", "replace").strip()
        if snippet and snippet.isprintable():
            text += f": {snippet}"
    return text, codes


class RegistryClient:
    """Requests to registries, shared by every image of a session (later: of the daemon)."""

    def __init__(self, settings: RegistrySettings, auth: AuthProvider | None = None) -> None:
        self.settings = settings
        self.auth = auth
        self.pool = ConnectionPool(settings.timeouts, self._ssl_context)
        self._endpoints: dict[str, _Endpoint] = {}

    async def aclose(self) -> None:
        await self.pool.aclose()

    def _ssl_context(self, authority: str) -> ssl.SSLContext:
        return create_ssl_context(self.settings.cert_dirs(authority), verify=not self.settings.insecure(authority))

    # ------------------------------------------------------------------ endpoints

    async def _endpoint(self, authority: str) -> _Endpoint:
        """Ping ``/v2/`` (https, then http for an insecure host) to learn the scheme and the challenge."""
        known = self._endpoints.get(authority)
        if known is not None:
            return known
        schemes = ["https", "http"] if self.settings.insecure(authority) else ["https"]
        failure: Exception | None = None
        for scheme in schemes:
            try:
                response = await self._send_with_retries(f"{scheme}://{authority}/v2/", (), authority)
            except RegistryError as e:
                failure = e
                continue
            async with response:
                await _drain(response)
            if response.status in (200, 401):
                endpoint = _Endpoint(scheme, response.headers.get("www-authenticate"))
                self._endpoints[authority] = endpoint
                return endpoint
            failure = RegistryError(
                f"pinging registry {authority}: unexpected {response.status} {response.reason} for GET /v2/",
                status=response.status,
                retryable=response.status in RETRYABLE_STATUSES,
            )
        assert failure is not None
        if len(schemes) == 1 and isinstance(failure, RegistryError) and failure.status is None:
            raise RegistryError(
                f"{failure} (for a plain-HTTP or self-signed registry, use --tls-verify=false or mark it "
                "insecure in registries.conf)",
                retryable=failure.code is ErrorCode.RETRYABLE,
            ) from None
        raise failure

    # ------------------------------------------------------------------ requests

    async def get(self, authority: str, repository: str, path: str, headers: Sequence[tuple[str, str]] = ()):
        """``GET /v2/<repository>/<path>`` with authorization, redirects and retries.

        Returns the final response whatever its status (the caller owns it and must close it);
        raises RegistryError when the registry cannot be reached or keeps failing.
        """
        endpoint = await self._endpoint(authority)
        url = f"{endpoint.scheme}://{authority}/v2/{repository}/{path}"
        scopes = [f"repository:{repository}:pull"]
        answered_challenge = False
        while True:
            pairs = [("User-Agent", self.settings.user_agent), *headers]
            authorization = await self._authorization(authority, endpoint, scopes)
            if authorization:
                pairs.append(("Authorization", authorization))
            response = await self._send_with_retries(url, pairs, authority)
            if response.status == 401 and not answered_challenge and self.auth is not None:
                challenge = response.headers.get("www-authenticate")
                if challenge:
                    await _drain(response)
                    await response.aclose()
                    endpoint.challenge = challenge
                    self.auth.invalidate(authority, scopes)
                    answered_challenge = True
                    continue
            return response

    async def _authorization(self, authority: str, endpoint: _Endpoint, scopes: list[str]) -> str | None:
        if self.auth is None or endpoint.challenge is None:
            return None
        return await self.auth.authorization(self.pool, authority, endpoint.challenge, scopes)

    async def _send_with_retries(self, url: str, headers: Sequence[tuple[str, str]], authority: str):
        policy = self.settings.retry
        deadline = trio.current_time() + policy.deadline
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = await request_following_redirects(self.pool, "GET", URL.parse(url), list(headers))
            except HTTPError as e:
                if not e.retryable:
                    raise RegistryError(f"{_what(url)}: {e}", retryable=False) from None
                failure: RegistryError = RegistryError(f"{_what(url)}: {e}", retryable=True)
            else:
                if response.status not in RETRYABLE_STATUSES:
                    return response
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                body = await _read_error_body(response)
                text, codes = describe_failure(response.status, response.reason, body)
                failure = RegistryError(f"{_what(url)}: {text}", status=response.status, codes=codes, retryable=True)
            attempt += 1
            delay = policy.delay(attempt - 1, retry_after)
            if attempt >= policy.attempts or trio.current_time() + delay > deadline:
                raise RegistryError(
                    f"{failure} (gave up after {attempt} attempts)",
                    status=failure.status,
                    codes=failure.codes,
                    retryable=True,
                )
            log.info("%s; retrying in %.1f s (attempt %d of %d)", failure, delay, attempt + 1, policy.attempts)
            await trio.sleep(delay)

    async def failure(self, response, what: str, authority: str) -> RegistryError:
        """Turn a non-2xx response into an error that says what failed where (and closes the response)."""
        sent_credentials = self.auth is not None and self.auth.has_credentials(authority)
        body = await _read_error_body(response)
        text, codes = describe_failure(response.status, response.reason, body)
        if response.status in (401, 403):
            who = "credentials were sent" if sent_credentials else "no credentials were sent"
            return RegistryError(
                f"{what}: registry {authority} refused access ({text}; {who})", status=response.status, codes=codes
            )
        retryable = response.status in RETRYABLE_STATUSES and not set(codes) & FINAL_CODES
        return RegistryError(f"{what}: {text}", status=response.status, codes=codes, retryable=retryable)


def _what(url: str) -> str:
    return f"GET {url}"


async def _drain(response) -> None:
    with contextlib.suppress(HTTPError):
        await response.read_all(MAX_ERROR_BODY)


async def _read_error_body(response) -> bytes:
    try:
        return await response.read_all(MAX_ERROR_BODY)
    except HTTPError:
        return b""
    finally:
        await response.aclose()
