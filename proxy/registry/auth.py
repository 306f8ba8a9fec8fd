"""Registry authentication: ``WWW-Authenticate`` challenges, Basic, and Bearer tokens from a token server.

- :func:`parse_www_authenticate`: an RFC 7235 challenge parser (several challenges per header, quoted strings with
  escapes, token68) that tolerates garbage and never raises. No I/O.
- :class:`RegistryAuth`: one per registry host. :meth:`RegistryAuth.authorization` turns the registry's challenges,
  the scopes a request needs and (optional) credentials into an ``Authorization`` value: Basic, a static registry
  token, or a Bearer token fetched from the challenge's realm (docker token GET, or OAuth2 POST with an identity
  token) and cached per (realm, service, scopes, credentials) until shortly before it expires. Concurrent callers
  wanting the same token share one fetch. :meth:`RegistryAuth.invalidate` drops a token the registry refused.
- :func:`send_authorized`: every request to a registry (``RegistryClient.get`` sends through it): auth,
  redirects, and a 401 from the registry answered once.

Credentials and tokens go only to the registry endpoint (Basic, or the token) and to the token realm the registry
named in its own 401 (token GET/POST); never to a redirect target on another origin. A challenge is believed only
when the registry itself sent it (:meth:`RegistryAuth.own_challenges`): a 401 from anywhere else (a redirect
target, a CDN, the registry reached again through another host) is an :class:`UnauthorizedElsewhere` error naming
that host, never a reason to fetch a token, and its challenge is never kept. Errors (:class:`AuthError`) name the
realm and the registry and say whether credentials were sent; passwords and tokens never appear in messages or
logs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import attrs
import trio

from protocol.errors import ErrorCode, ProxyError
from proxy.http.connection import Response
from proxy.http.errors import HTTPError
from proxy.http.headers import HeaderInput, header_pairs, without
from proxy.http.pool import ConnectionPool
from proxy.http.redirects import request_following_redirects
from proxy.http.url import URL, Origin
from proxy.registry.challenges import Challenge, Scope, parse_challenges
from proxy.registry.tokens import MIN_TOKEN_LIFETIME, Token, parse_token_response

log = logging.getLogger(__name__)

#: token answers are read up to this size (containers/image: iolimits.MaxAuthTokenBodySize)
MAX_TOKEN_BODY = 1 << 20
#: error answers from the token server: read this much for the message
MAX_ERROR_BODY = 64 * 1024
#: refresh a token this long before it expires (at most a quarter of its lifetime)
REFRESH_MARGIN = 10.0
#: statuses from the token server worth trying again
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 499, 522})
#: the OAuth2 ``client_id``
CLIENT_ID = "image-proxy"
#: at most this many cached tokens per registry; expired ones go first when it is full
MAX_CACHED_TOKENS = 256


def response_challenges(response: Response) -> list[Challenge]:
    return parse_challenges(response.headers.get_all("www-authenticate"))


# -- scopes and credentials ------------------------------------------------------------------------------------


class Credentials(Protocol):
    """What :class:`RegistryAuth` needs from credentials (``proxy.config.auth_files.Credentials`` fits).

    An ``identity_token`` attribute (optional, may be None) selects the OAuth2 refresh-token flow."""

    @property
    def username(self) -> str: ...

    @property
    def password(self) -> str: ...


def _identity_token(credentials: Credentials | None) -> str | None:
    token = getattr(credentials, "identity_token", None)
    return token if isinstance(token, str) and token else None


def _has_password(credentials: Credentials | None) -> bool:
    return credentials is not None and bool(credentials.username or credentials.password)


def basic_authorization(username: str, password: str) -> str:
    # an auth file's bytes that are not UTF-8 were decoded with surrogateescape: they go out as they were (as Go's)
    userpass = f"{username}:{password}".encode("utf-8", "surrogateescape")
    return "Basic " + base64.b64encode(userpass).decode("ascii")


def _credential_id(credentials: Credentials | None) -> str:
    """A key for the token cache that tells credentials apart without keeping them readable."""
    if credentials is None:
        return ""
    material = "\0".join((credentials.username, credentials.password, _identity_token(credentials) or ""))
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


# -- errors ----------------------------------------------------------------------------------------------------


class AuthError(ProxyError):
    """Authentication failed: which realm and registry, whether credentials were sent, whether to retry."""

    def __init__(
        self,
        message: str,
        *,
        registry: str,
        realm: str = "",
        status: int | None = None,
        credentials_sent: bool = False,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, ErrorCode.RETRYABLE if retryable else ErrorCode.OTHER)
        self.registry = registry
        self.realm = realm
        self.status = status
        self.credentials_sent = credentials_sent
        self.retryable = retryable


class UnauthorizedElsewhere(AuthError):
    """A host other than the registry endpoint answered 401: an error naming it, never a reason to send
    credentials or to fetch a token (its challenge names a realm the registry did not choose)."""

    def __init__(self, message: str, *, registry: str, host: str) -> None:
        super().__init__(message, registry=registry, status=401)
        #: who answered (``host:port``)
        self.host = host


def _chain(response: Response) -> list[URL]:
    """The URLs the request went to, first to last (the ones that do not parse are left out)."""
    urls = []
    for text in (*response.history, response.url):
        with contextlib.suppress(HTTPError):
            urls.append(URL.parse(text))
    return urls


def answered_elsewhere(response: Response, origin: Origin, name: str) -> str | None:
    """None when ``response`` came from ``origin`` and its redirects (if any) never left it; else who answered,
    for an error text: ``"storage:8443 (a redirect target of <name>)"``, or, when a redirect chain left ``origin``
    and came back, ``"<name> (reached again through a redirect via storage:8443)"``. Only host names and ports,
    never a redirect target's path or query (a presigned URL's signature)."""
    chain = _chain(response)
    if all(url.origin == origin for url in chain):
        return None
    final = chain[-1]
    if final.origin != origin:
        return f"{final.authority} (a redirect target of {name})"
    via = next(url.authority for url in chain if url.origin != origin)
    return f"{name} (reached again through a redirect via {via})"


def _redact(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _snippet(body: bytes, secrets: Iterable[str | None]) -> str:
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    text = "".join(c if c.isprintable() else "?" for c in text)[:200]
    return _redact(text, secrets)


@attrs.define
class _Slot:
    lock: trio.Lock = attrs.Factory(trio.Lock)
    token: Token | None = None


CacheKey = tuple[str, str, tuple[str, ...], str]


def _scope_strings(scopes: Iterable[Scope | str]) -> list[str]:
    """Scopes as strings, duplicates removed, order kept (the first one matters to some servers)."""
    seen: dict[str, None] = {}
    for scope in scopes:
        seen.setdefault(str(scope), None)
    return list(seen)


class RegistryAuth:
    """Authorization for one registry (``https://host:port``).

    ``insecure``: the registry is reached over plain http or without TLS verification, so an http realm is
    acceptable. ``registry_token``: a static bearer token, sent as it is to bearer challenges (no token fetch).
    ``clock``: wall-clock seconds (``issued_at`` is wall-clock), injectable for tests.
    ``oauth2_password_grant``: fetch tokens with an OAuth2 ``password`` grant POST (falling back to GET on 404)
    instead of a GET with Basic credentials (the docker/containers default)."""

    def __init__(
        self,
        registry: str | URL | Origin,
        *,
        insecure: bool = False,
        registry_token: str | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = REFRESH_MARGIN,
        oauth2_password_grant: bool = False,
        user_agent: str | None = None,
    ) -> None:
        if isinstance(registry, str):
            registry = URL.parse(registry if "://" in registry else f"https://{registry}/")
        self.origin = registry.origin if isinstance(registry, URL) else registry
        self.insecure = insecure
        self.registry_token = registry_token
        self.clock = clock
        self.refresh_margin = refresh_margin
        self.oauth2_password_grant = oauth2_password_grant
        self.user_agent = user_agent
        #: the challenges last seen from this registry itself (see :meth:`own_challenges`)
        self.challenges: list[Challenge] = []
        #: how many token requests went out (for tests and diagnostics)
        self.token_fetches = 0
        self._slots: dict[CacheKey, _Slot] = {}

    @property
    def registry(self) -> str:
        return self.origin.authority

    # -- public ----------------------------------------------------------------------------------------------

    async def authorization(
        self,
        pool: ConnectionPool,
        challenges: Sequence[Challenge],
        scopes: Sequence[Scope | str],
        credentials: Credentials | None = None,
    ) -> str | None:
        """The ``Authorization`` value for a request needing ``scopes``, or None (no usable challenge, or a
        basic challenge without credentials). The first basic or bearer challenge decides, as in
        containers/image."""
        for challenge in challenges:
            if challenge.scheme == "basic":
                if credentials is None or not _has_password(credentials):
                    return None
                return basic_authorization(credentials.username, credentials.password)
            if challenge.scheme == "bearer":
                if self.registry_token:
                    return f"Bearer {self.registry_token}"
                token = await self.token(pool, challenge, scopes, credentials)
                return f"Bearer {token.value}"
            log.debug("registry %s: ignoring the %r challenge", self.registry, challenge.scheme)
        return None

    async def token(
        self,
        pool: ConnectionPool,
        challenge: Challenge,
        scopes: Sequence[Scope | str],
        credentials: Credentials | None = None,
    ) -> Token:
        """A cached or freshly fetched token for ``scopes`` from ``challenge``'s realm."""
        realm = self._realm_url(challenge)
        scope_list = _scope_strings(scopes)
        key = (str(realm), challenge.service, tuple(sorted(scope_list)), _credential_id(credentials))
        slot = self._slots.get(key)
        if slot is None:
            self._make_room()
            slot = self._slots[key] = _Slot()
        if (token := self._usable(slot)) is not None:
            return token
        async with slot.lock:  # one fetch per key; the others wait for it and use its result
            if (token := self._usable(slot)) is not None:
                return token
            slot.token = await self._fetch(pool, realm, challenge.service, scope_list, credentials)
            return slot.token

    def own_challenges(self, response: Response) -> list[Challenge]:
        """The challenges of a 401 ``response`` when the registry endpoint itself answered it, every hop on its
        origin (nothing for any other status).

        The one gate for challenges: a 401 from any other host (a redirect target, a CDN, a lookalike on another
        port or scheme, the registry reached again through a redirect via another host) raises
        :class:`UnauthorizedElsewhere` naming that host; nothing of it is kept, no token is fetched for it and no
        credentials are sent because of it. The caller still owns (and closes) ``response``."""
        if response.status != 401:
            return []
        elsewhere = answered_elsewhere(response, self.origin, self.registry)
        if elsewhere is None:
            return response_challenges(response)
        final = _chain(response)[-1]
        why = (
            "credentials are sent only to the registry"
            if final.origin != self.origin
            else "credentials do not follow a redirect that left the registry"
        )
        log.warning("registry %s: %s answered 401; its challenge is ignored", self.registry, elsewhere)
        raise UnauthorizedElsewhere(
            f"{elsewhere} answered 401 Unauthorized; {why}",
            registry=self.registry,
            host=final.authority,
        )

    def invalidate(self, challenges: Sequence[Challenge], scopes: Sequence[Scope | str]) -> list[Scope | str]:
        """The registry refused a request made for ``scopes`` and sent ``challenges``: forget the tokens for those
        scopes (any realm, any credentials) and return the scopes to ask for next: the scopes the challenges
        name that are missing (``insufficient_scope``) first, then ``scopes``."""
        wanted = tuple(sorted(_scope_strings(scopes)))
        for key, slot in self._slots.items():
            if key[2] == wanted:
                slot.token = None
        self.challenges = list(challenges)
        named: list[Scope | str] = []
        for challenge in challenges:
            if challenge.scheme == "bearer" and "scope" in challenge.params:
                named.extend(Scope.parse_list(challenge.params["scope"]))
        have = set(_scope_strings(scopes))
        extra = [scope for scope in named if str(scope) not in have]
        merged: list[Scope | str] = []
        for scope in [*extra, *scopes]:
            if str(scope) not in {str(s) for s in merged}:
                merged.append(scope)
        return merged

    def clear(self) -> None:
        self._slots.clear()

    # -- internals -------------------------------------------------------------------------------------------

    def _usable(self, slot: _Slot) -> Token | None:
        token = slot.token
        if token is None:
            return None
        now = self.clock()
        lifetime_left = token.expires_at - now
        margin = min(self.refresh_margin, MIN_TOKEN_LIFETIME / 4)
        return token if lifetime_left > margin else None

    def _make_room(self) -> None:
        if len(self._slots) < MAX_CACHED_TOKENS:
            return
        now = self.clock()
        for key in [
            k for k, s in self._slots.items() if not s.lock.locked() and (s.token is None or s.token.expires_at <= now)
        ]:
            del self._slots[key]
        while len(self._slots) >= MAX_CACHED_TOKENS:
            victim = next((k for k, s in self._slots.items() if not s.lock.locked()), None)
            if victim is None:
                break
            del self._slots[victim]

    def _realm_url(self, challenge: Challenge) -> URL:
        realm = challenge.realm
        if not realm:
            raise AuthError(f"registry {self.registry} sent a bearer challenge without a realm", registry=self.registry)
        try:
            url = URL.parse(realm)
        except HTTPError as e:
            raise AuthError(
                f"registry {self.registry} sent an unusable token realm {realm!r}: {e}",
                registry=self.registry,
                realm=realm,
            ) from None
        if url.scheme == "http" and self.origin.scheme == "https" and not self.insecure:
            raise AuthError(
                f"refusing the plain-http token realm {realm} of the https registry {self.registry} "
                "(credentials and tokens would travel unencrypted; mark the registry insecure to allow it)",
                registry=self.registry,
                realm=realm,
            )
        return url

    def _headers(self) -> list[tuple[str, str]]:
        headers = [("Accept", "application/json"), ("Accept-Encoding", "identity")]
        if self.user_agent:
            headers.append(("User-Agent", self.user_agent))
        return headers

    async def _fetch(
        self, pool: ConnectionPool, realm: URL, service: str, scopes: list[str], credentials: Credentials | None
    ) -> Token:
        identity = _identity_token(credentials)
        if identity is not None or (self.oauth2_password_grant and _has_password(credentials)):
            token = await self._fetch_oauth2(pool, realm, service, scopes, credentials)
            if token is not None:
                return token
        return await self._fetch_get(pool, realm, service, scopes, credentials if identity is None else None)

    async def _fetch_get(
        self, pool: ConnectionPool, realm: URL, service: str, scopes: list[str], credentials: Credentials | None
    ) -> Token:
        """``GET realm?service=..&scope=..&account=..`` with Basic credentials when there are any."""
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(realm.target).query, keep_blank_values=True)
        if service:
            query.append(("service", service))
        query.extend(("scope", scope) for scope in scopes)
        headers = self._headers()
        sent = credentials is not None and _has_password(credentials)
        if credentials is not None and sent:
            if credentials.username:
                query.append(("account", credentials.username))
            headers.append(("Authorization", basic_authorization(credentials.username, credentials.password)))
        path = realm.target.partition("?")[0]
        url = attrs.evolve(realm, target=path + ("?" + urllib.parse.urlencode(query) if query else ""))
        status, body, elsewhere = await self._exchange(pool, "GET", url, headers, b"", realm, credentials, sent)
        return self._token_from(status, body, realm, credentials, sent, elsewhere)

    async def _fetch_oauth2(
        self, pool: ConnectionPool, realm: URL, service: str, scopes: list[str], credentials: Credentials | None
    ) -> Token | None:
        """The OAuth2 POST (refresh_token grant with an identity token, else password grant). None on 404:
        the server does not do OAuth2, use GET."""
        assert credentials is not None
        form = [("grant_type", ""), ("service", service), ("client_id", CLIENT_ID)]
        identity = _identity_token(credentials)
        if identity is not None:
            form[0] = ("grant_type", "refresh_token")
            form.append(("refresh_token", identity))
        else:
            form[0] = ("grant_type", "password")
            form += [("username", credentials.username), ("password", credentials.password)]
            form.append(("access_type", "online"))
        if scopes:
            form.append(("scope", " ".join(scopes)))
        headers = [*self._headers(), ("Content-Type", "application/x-www-form-urlencoded")]
        body = urllib.parse.urlencode(form).encode()
        status, answer, _ = await self._exchange(pool, "POST", realm, headers, body, realm, credentials, True)
        if status in (404, 405):
            log.debug("token server %s does not do OAuth2 (%d), using GET", _realm_name(realm), status)
            return None
        return self._token_from(status, answer, realm, credentials, True)

    async def _exchange(
        self,
        pool: ConnectionPool,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes,
        realm: URL,
        credentials: Credentials | None,
        sent: bool,
    ) -> tuple[int, bytes, str | None]:
        """(status, body, who answered when it was not the realm: a redirect target, see
        :func:`answered_elsewhere`). A GET follows redirects, without the credentials once it leaves the realm's
        origin; a POST (its body holds them) is not followed."""
        self.token_fetches += 1
        try:
            if method == "GET":
                response = await request_following_redirects(pool, method, url, headers)
            else:
                response = await pool.send(method, url, headers, body)
            async with response:
                limit = MAX_TOKEN_BODY if response.status == 200 else MAX_ERROR_BODY
                elsewhere = answered_elsewhere(response, realm.origin, f"token server {_realm_name(realm)}")
                return response.status, await response.read_all(limit), elsewhere
        except HTTPError as e:
            raise AuthError(
                f"cannot get a token from {_realm_name(realm)} for registry {self.registry} "
                f"({_sent_text(credentials, sent)}): {_redact(str(e), _secrets(credentials))}",
                registry=self.registry,
                realm=_realm_name(realm),
                credentials_sent=sent,
                retryable=e.retryable,
            ) from e

    def _token_from(
        self,
        status: int,
        body: bytes,
        realm: URL,
        credentials: Credentials | None,
        sent: bool,
        elsewhere: str | None = None,
    ) -> Token:
        where = f"{elsewhere or f'token server {_realm_name(realm)}'} for registry {self.registry}"
        if status != 200:
            hint = ""
            if status in (401, 403) and elsewhere is not None:
                hint = " (credentials go only to the token server the registry named, not where it redirects)"
                sent = False
            elif status in (401, 403):
                hint = " (check the credentials)" if sent else " (no credentials were found for this registry)"
            detail = _snippet(body, _secrets(credentials))
            raise AuthError(
                f"{where} answered {status} ({_sent_text(credentials, sent)}){hint}"
                + (f": {detail}" if detail else ""),
                registry=self.registry,
                realm=_realm_name(realm),
                status=status,
                credentials_sent=sent,
                retryable=status in RETRYABLE_STATUSES,
            )
        try:
            token = parse_token_response(body, self.clock())
        except ValueError as e:
            raise AuthError(
                f"{where} sent an unusable answer: {e}",
                registry=self.registry,
                realm=_realm_name(realm),
                status=status,
                credentials_sent=sent,
            ) from None
        log.debug(
            "token from %s for registry %s, %.0f s left",
            _realm_name(realm),
            self.registry,
            token.expires_at - self.clock(),
        )
        return token


def _realm_name(realm: URL) -> str:
    """The realm without its query (short, and free of anything a server may have put there)."""
    return f"{realm.scheme}://{realm.authority}{realm.target.partition('?')[0]}"


def _sent_text(credentials: Credentials | None, sent: bool) -> str:
    if not sent or credentials is None:
        return "anonymously, no credentials sent"
    if _identity_token(credentials) is not None:
        return "with an identity token"
    return f"with the credentials of user {credentials.username!r}"


def _secrets(credentials: Credentials | None) -> list[str | None]:
    if credentials is None:
        return []
    return [credentials.password, _identity_token(credentials)]


# -- requests --------------------------------------------------------------------------------------------------


Sender = Callable[[URL, list[tuple[str, str]]], Awaitable[Response]]


async def send_authorized(
    pool: ConnectionPool,
    auth: RegistryAuth,
    method: str,
    url: str | URL,
    scopes: Sequence[Scope | str],
    credentials: Credentials | None = None,
    headers: HeaderInput = (),
    *,
    max_hops: int = 10,
    send: Sender | None = None,
) -> Response:
    """Send a GET/HEAD-like request (no body) to the registry with the ``Authorization`` that ``auth.challenges``
    call for (only when ``url`` is on the registry's origin), following redirects (which drop ``Authorization``
    on leaving the registry's origin).

    A 401 the registry itself sent, carrying a challenge, is answered once: the challenges are kept, the refused
    token is dropped, scopes the challenge names are added, and the request is sent again. A 401 from anywhere
    else raises :class:`UnauthorizedElsewhere` (see :meth:`RegistryAuth.own_challenges`), also on the second try.

    ``send(url, headers)`` sends one request and follows its redirects (default: :func:`request_following_redirects`
    with ``max_hops``); the registry client passes one that also retries. The caller closes the returned response.
    """
    target = url if isinstance(url, URL) else URL.parse(url)
    pairs = without(header_pairs(headers), "authorization")
    current_scopes: Sequence[Scope | str] = list(scopes)

    async def follow(where: URL, request_headers: list[tuple[str, str]]) -> Response:
        return await request_following_redirects(pool, method, where, request_headers, max_hops)

    sender = send or follow
    for attempt in range(2):
        request_headers = list(pairs)
        if target.origin == auth.origin and auth.challenges:
            value = await auth.authorization(pool, auth.challenges, current_scopes, credentials)
            if value is not None:
                request_headers.append(("Authorization", value))
        response = await sender(target, request_headers)
        if response.status != 401:
            return response
        try:
            challenges = auth.own_challenges(response)
        except UnauthorizedElsewhere:
            await _drain(response)
            raise
        if attempt == 1 or not challenges:
            return response
        await _drain(response)
        current_scopes = auth.invalidate(challenges, current_scopes)
    raise AssertionError("unreachable")  # pragma: no cover


async def _drain(response: Response) -> None:
    length = response.content_length
    if length is not None and length <= MAX_ERROR_BODY:
        with contextlib.suppress(HTTPError):
            await response.read_all(MAX_ERROR_BODY)
    await response.aclose()
