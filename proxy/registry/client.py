"""Talking to one registry host (distribution API v2): scheme detection, authorization, retries and
honest errors. The image logic (which manifest, which source for a blob) is in ``registry.py``.

Every request goes through :meth:`RegistryClient.get`, which sends it through
:func:`proxy.registry.auth.send_authorized`: it follows redirects (dropping ``Authorization`` when the origin
changes), answers a 401 challenge of the registry itself once, and retries what is worth retrying with
full-jitter backoff that honours ``Retry-After`` and counts toward a deadline. A 401 from any other host (a
redirect target: storage, a CDN) is an error naming that host; its challenge is never kept, so no later request
sends credentials or fetches a token because of it. What it gives up on becomes a :class:`RegistryError` whose
text names the host and what failed, and whose code is ``retryable`` exactly when trying again later may help.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Sequence

import attrs
import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.common import jsonlimits, threads
from proxy.config import Credentials, CredentialSource, RegistryToken
from proxy.http.connection import Response
from proxy.http.errors import ConnectError, HTTPError
from proxy.http.pool import ConnectionPool
from proxy.http.redirects import request_following_redirects
from proxy.http.retry import ONE_TRY, RETRYABLE_STATUSES, RetryPolicy, parse_retry_after
from proxy.http.tls import create_ssl_context
from proxy.http.url import URL
from proxy.registry.auth import RegistryAuth, UnauthorizedElsewhere, answered_elsewhere, send_authorized
from proxy.registry.challenges import Challenge, pull
from proxy.registry.settings import RegistrySettings

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
        self,
        message: str,
        *,
        status: int | None = None,
        codes: Sequence[str] = (),
        retryable: bool = False,
        refused: bool = False,
    ) -> None:
        super().__init__(message, ErrorCode.RETRYABLE if retryable else ErrorCode.OTHER)
        self.status = status
        self.codes = tuple(codes)
        #: the host refused the TCP connection (no TLS or HTTP was spoken)
        self.refused = refused

    @property
    def not_found(self) -> bool:
        """An authoritative "does not exist": 404 with a distribution not-found code."""
        return self.status == 404 and any(code in NOT_FOUND_CODES for code in self.codes)


@attrs.define
class _Endpoint:
    """What we learnt about one registry host."""

    scheme: str
    #: also holds the challenges the registry itself sent last (``auth.challenges``)
    auth: RegistryAuth
    #: whether the last request there carried the user's credentials (for error texts)
    sent_credentials: bool = False


def _parse_errors(body: bytes) -> list[dict]:
    try:
        doc = jsonlimits.loads(body)
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

    def __init__(
        self,
        settings: RegistrySettings,
        credentials: CredentialSource | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        """``pool``: connections shared with another client (:meth:`for_session`), which closes them; None: a pool
        of this client's own."""
        self.settings = settings
        self.credentials = credentials
        self._owns_pool = pool is None
        self.pool = ConnectionPool(settings.timeouts, self._ssl_context) if pool is None else pool
        self._endpoints: dict[str, _Endpoint] = {}
        self._lookups: dict[tuple[str, str, str], Credentials | RegistryToken | None] = {}

    def for_session(self, credentials: CredentialSource | None, user_agent_prefix: str | None = None) -> RegistryClient:
        """A client for one daemon connection that brought its own credentials (``SetSessionSettings``): this
        client's connections (TLS, timeouts and registries.conf stay the daemon's), its own credentials, tokens
        and registry challenges, and its user agent's prefix. Closing it leaves the connections to this client:
        a download it started for the blob cache may outlive its session."""
        settings = self.settings
        if user_agent_prefix:
            settings = attrs.evolve(settings, user_agent=f"{user_agent_prefix} {settings.user_agent}")
        return RegistryClient(settings, credentials, pool=self.pool)

    async def aclose(self) -> None:
        if self._owns_pool:
            await self.pool.aclose()

    def _ssl_context(self, authority: str) -> ssl.SSLContext:
        return create_ssl_context(self.settings.cert_dirs(authority), verify=not self.settings.insecure(authority))

    # ------------------------------------------------------------------ endpoints

    async def _endpoint(self, authority: str, retry: RetryPolicy | None = None) -> _Endpoint:
        """Ping ``/v2/`` (https, then http for an insecure host) to learn the scheme and the challenge."""
        known = self._endpoints.get(authority)
        if known is not None:
            return known
        schemes = ["https", "http"] if self.settings.insecure(authority) else ["https"]
        failure: Exception | None = None
        for scheme in schemes:
            # With a plain-HTTP fallback, https gets one try (as containers/image does): a server that
            # speaks no TLS fails the handshake the same way every time.
            policy = ONE_TRY if scheme != schemes[-1] else retry
            try:
                response = await self._send_with_retries(f"{scheme}://{authority}/v2/", (), authority, policy)
            except RegistryError as e:
                failure = e
                continue
            auth = self._auth(scheme, authority)
            async with response:
                await _drain(response)
                try:
                    auth.challenges = auth.own_challenges(response)
                except UnauthorizedElsewhere as e:
                    raise RegistryError(f"pinging registry {authority}: {e}", status=401) from None
            if response.status in (200, 401):
                endpoint = _Endpoint(scheme, auth)
                self._endpoints[authority] = endpoint
                return endpoint
            failure = RegistryError(
                f"pinging registry {authority}: unexpected {response.status} {response.reason} for GET /v2/",
                status=response.status,
                retryable=response.status in RETRYABLE_STATUSES,
            )
        assert failure is not None
        if len(schemes) == 1 and isinstance(failure, RegistryError) and failure.status is None and not failure.refused:
            raise RegistryError(
                f"{failure} (for a plain-HTTP or self-signed registry, use --tls-verify=false or mark it "
                "insecure in registries.conf)",
                retryable=failure.code is ErrorCode.RETRYABLE,
            ) from None
        raise failure

    # ------------------------------------------------------------------ requests

    def _auth(self, scheme: str, authority: str, registry_token: str | None = None) -> RegistryAuth:
        return RegistryAuth(
            f"{scheme}://{authority}",
            insecure=self.settings.insecure(authority),
            registry_token=registry_token,
            user_agent=self.settings.user_agent,
        )

    async def get(
        self,
        authority: str,
        repository: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        logical_host: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> Response:
        """``GET /v2/<repository>/<path>`` with authorization, redirects and retries.

        ``logical_host`` is the registry the user named (it differs for a mirror, where command-line
        credentials are not sent). Returns the final response whatever its status (the caller owns it
        and must close it); raises RegistryError when the registry cannot be reached or keeps failing.
        """
        endpoint = await self._endpoint(authority, retry)
        text = f"{endpoint.scheme}://{authority}/v2/{repository}/{path}"
        try:
            url = URL.parse(text)
        except HTTPError as e:
            raise RegistryError(f"{_what(text)}: {e}", retryable=False) from None
        found = await self._credentials(endpoint, authority, repository, logical_host or authority)
        credentials = found if isinstance(found, Credentials) else None
        endpoint.sent_credentials = found is not None

        async def send(target: URL, pairs: list[tuple[str, str]]) -> Response:
            return await self._send_with_retries(str(target), pairs, authority, retry)

        pairs = [("User-Agent", self.settings.user_agent), *headers]
        try:
            return await send_authorized(
                self.pool, endpoint.auth, "GET", url, [pull(repository)], credentials, pairs, send=send
            )
        except UnauthorizedElsewhere as e:
            # the registry did not refuse us: a host it redirected to did (storage, a CDN); nothing of that
            # answer was kept, and this is not worth retrying (the same redirect would get the same answer)
            raise RegistryError(str(e), status=401) from None

    async def _credentials(
        self, endpoint: _Endpoint, authority: str, repository: str, logical_host: str
    ) -> Credentials | RegistryToken | None:
        """What to authenticate with there, looked up once per session (helpers are processes)."""
        if self.credentials is None:
            return None
        key = (authority, repository, logical_host)
        if key not in self._lookups:
            source = self.credentials
            found = await threads.run_sync(lambda: source.lookup(authority, repository, logical_host=logical_host))
            if isinstance(found, RegistryToken):
                # --registry-token: sent as the bearer token itself, with or without a challenge
                challenges = endpoint.auth.challenges
                endpoint.auth = self._auth(endpoint.scheme, authority, found.token)
                endpoint.auth.challenges = challenges or [Challenge("bearer", {})]
            self._lookups[key] = found
        return self._lookups[key]

    async def _send_with_retries(
        self, url: str, headers: Sequence[tuple[str, str]], authority: str, retry: RetryPolicy | None = None
    ) -> Response:
        policy = retry or self.settings.retry
        deadline = trio.current_time() + policy.deadline
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = await request_following_redirects(self.pool, "GET", URL.parse(url), list(headers))
            except HTTPError as e:
                if not e.retryable:
                    raise RegistryError(f"{_what(url)}: {e}", retryable=False) from None
                if isinstance(e, ConnectError) and e.refused:
                    # nothing listens there: no backoff within this request (skopeo answers at once too); the
                    # client may try again later, so the error stays retryable
                    raise RegistryError(f"{_what(url)}: {e}", retryable=True, refused=True) from None
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

    async def failure(self, response: Response, what: str, authority: str) -> RegistryError:
        """Turn a non-2xx response into an error that says what failed where (and closes the response)."""
        endpoint = self._endpoints.get(authority)
        sent_credentials = endpoint is not None and endpoint.sent_credentials
        elsewhere = None if endpoint is None else answered_elsewhere(response, endpoint.auth.origin, authority)
        body = await _read_error_body(response)
        text, codes = describe_failure(response.status, response.reason, body)
        if response.status in (401, 403) and elsewhere is not None:
            # a redirect target refused: it never gets credentials, so they cannot be what is wrong
            return RegistryError(
                f"{what}: {elsewhere} refused access ({text}; credentials are sent only to the registry)",
                status=response.status,
                codes=codes,
            )
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
