"""A small token server (trio + h11) that signs JWTs the real distribution 2.8 registry accepts.

What distribution 2.8 (``registry/auth/token``, libtrust era) checks, found by reading its source and by running it:

- the JOSE header names the signing key by ``x5c`` (a chain of standard-base64 DER certificates, verified against
  ``rootcertbundle``), by ``jwk``, or by ``kid`` (a libtrust fingerprint of a key in ``rootcertbundle``); ``alg``
  ES256/384/512 or RS256/384/512, ECDSA signatures as JWS ``r || s`` (not DER);
- claims: ``iss`` equal to the configured ``issuer``, ``aud`` equal to the configured ``service`` (a plain string
  works), ``exp``/``nbf`` with 60 s of leeway, ``access`` as ``[{type, name, actions}]``.

The issuer answers ``GET /token?service=..&scope=..`` (Basic credentials optional) and the OAuth2
``POST /token`` (``grant_type=password`` or ``refresh_token``), records every request and every token it handed
out (``issued``: what a fake registry checks a bearer token against), and can be told to fail or to hand out
tokens the registry will find expired.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.http.server import _next_request, serve_on_loopback

#: what anonymous and authenticated clients get, per repository ("*": any repository)
Grants = dict[str | None, dict[str, frozenset[str]]]


@attrs.frozen
class IssuedToken:
    """What a token the issuer handed out stands for."""

    #: None: anonymous
    user: str | None
    #: the granted scopes, ``repository:name:action`` one action each
    scopes: frozenset[str]


@attrs.frozen
class TokenRequest:
    """One request as the issuer saw it."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    form: tuple[tuple[str, str], ...]
    authorization: str | None
    host: str
    #: the user whose credentials were accepted (None: anonymous or refused)
    user: str | None
    status: int

    def params(self, name: str) -> list[str]:
        return [value for key, value in (*self.query, *self.form) if key == name]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The libtrust fingerprint: SHA-256 of the DER public key, 240 bits, base32, in 12 groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


class TokenIssuer:
    """Signs ES256 tokens with a self-signed P-256 certificate (which is the registry's ``rootcertbundle``)."""

    def __init__(
        self,
        *,
        service: str = "test-registry",
        issuer: str = "test-issuer",
        users: dict[str, str] | None = None,
        grants: Grants | None = None,
        refresh_tokens: dict[str, str] | None = None,
        expires_in: int | None = 300,
        key_by: str = "x5c",
        oauth2: bool = True,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.users = dict(users or {})
        self.grants: Grants = grants if grants is not None else {}
        self.refresh_tokens = dict(refresh_tokens or {})
        #: the ``expires_in`` of the answers (None: left out); the JWT itself is valid for max(this, 60) s
        self.expires_in = expires_in
        if key_by not in ("x5c", "kid"):
            raise ValueError("key_by must be 'x5c' or 'kid'")
        self.key_by = key_by
        #: False: POST answers 404, as token servers without OAuth2 do
        self.oauth2 = oauth2
        #: statuses to answer the next requests with, in turn (e.g. [500]), before issuing again
        self.fail_next: list[int] = []
        #: how many of the next tokens are signed with an ``exp`` long past (the registry refuses them)
        self.expired_next = 0
        self.requests: list[TokenRequest] = []
        #: every token handed out
        self.issued: dict[str, IssuedToken] = {}
        self.port = 0
        self.scheme = "http"
        self._jti = itertools.count(1)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token issuer")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    # -- for tests -----------------------------------------------------------------------------------------

    def realm(self, path: str = "/token", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def write_root_bundle(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def registry_auth_config(self, bundle: Path) -> dict[str, str]:
        """The ``auth: token:`` section of a registry configuration trusting this issuer."""
        return {
            "realm": self.realm(),
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.write_root_bundle(bundle)),
        }

    def sign(self, subject: str, access: list[dict[str, object]], *, lifetime: int, expired: bool = False) -> str:
        now = int(datetime.datetime.now(datetime.UTC).timestamp())
        issued = now - 7200 if expired else now
        header: dict[str, object] = {"typ": "JWT", "alg": "ES256"}
        if self.key_by == "x5c":
            header["x5c"] = [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()]
        else:
            header["kid"] = libtrust_key_id(self._key.public_key())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": issued + lifetime,
            "nbf": issued - 1,
            "iat": issued,
            "jti": f"token-{next(self._jti)}",
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def granted(self, user: str | None, scope: str) -> dict[str, object] | None:
        """The ``access`` entry for one requested scope: the requested actions this user has."""
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            return None
        table = self.grants.get(user, {})
        allowed = table.get(name, frozenset()) | table.get("*", frozenset())
        wanted = [action for action in actions.split(",") if action in allowed]
        return {"type": kind, "name": name, "actions": wanted}

    # -- serving -------------------------------------------------------------------------------------------

    def _authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(acceptable, user): no Authorization is acceptable and anonymous."""
        if authorization is None:
            return True, None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        if user in self.users and self.users[user] == password:
            return True, user
        return False, None

    def _answer(self, method: str, query: list[tuple[str, str]], form: list[tuple[str, str]], auth: str | None):
        """(status, body, accepted user)."""
        if self.fail_next:
            return self.fail_next.pop(0), b'{"details":"injected failure"}', None
        if method == "POST":
            if not self.oauth2:
                return 404, b"404 page not found\n", None
            fields = dict(form)
            grant = fields.get("grant_type")
            if grant == "password":
                user = fields.get("username")
                ok = user in self.users and self.users[user] == fields.get("password")
            elif grant == "refresh_token":
                user = self.refresh_tokens.get(fields.get("refresh_token", ""))
                ok = user is not None
            else:
                return 400, b'{"error":"unsupported_grant_type"}', None
            if not ok:
                return 401, b'{"error":"invalid_grant"}', None
            scopes = fields.get("scope", "").split()
        else:
            ok, user = self._authenticate(auth)
            if not ok:
                return 401, b'{"details":"incorrect username or password"}', None
            scopes = [value for key, value in query if key == "scope"]
        access = [entry for entry in (self.granted(user, scope) for scope in scopes) if entry is not None]
        lifetime = max(self.expires_in or 60, 60)
        expired = self.expired_next > 0
        self.expired_next -= 1 if expired else 0
        token = self.sign(user or "", access, lifetime=lifetime, expired=expired)
        granted = frozenset(
            f"{entry['type']}:{entry['name']}:{action}"
            for entry in access
            for action in entry["actions"]  # type: ignore[attr-defined]
        )
        self.issued[token] = IssuedToken(user, granted)
        answer: dict[str, object] = {"token": token, "access_token": token}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        answer["issued_at"] = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return 200, json.dumps(answer).encode(), user

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _next_request(stream, conn)
                if request is None:
                    return
                event, body = request
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                split = urllib.parse.urlsplit(event.target.decode())
                query = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
                form = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True) if event.method == b"POST" else []
                method = event.method.decode()
                if split.path != "/token":
                    status, payload, user = 404, b"not found\n", None
                else:
                    status, payload, user = self._answer(method, query, form, headers.get("authorization"))
                self.requests.append(
                    TokenRequest(
                        method=method,
                        path=split.path,
                        query=tuple(query),
                        form=tuple(form),
                        authorization=headers.get("authorization"),
                        host=headers.get("host", ""),
                        user=user,
                        status=status,
                    )
                )
                response_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=response_headers)) or b"")
                await stream.send_all(
                    (conn.send(h11.Data(data=payload)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                )
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serve_issuer(issuer: TokenIssuer, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[TokenIssuer]:
    """Run ``issuer`` on 127.0.0.1 (an ephemeral port) for the duration of the block."""
    issuer.scheme = "https" if ssl_context is not None else "http"
    async with serve_on_loopback(issuer._handle, ssl_context) as port:
        issuer.port = port
        yield issuer
