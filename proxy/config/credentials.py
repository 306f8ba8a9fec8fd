"""What a registry lookup can answer: a user name and secret, or a bearer token. Neither ever prints its secret."""

from __future__ import annotations

import attrs


@attrs.frozen(repr=False)
class Credentials:
    """``types.DockerAuthConfig``: basic credentials, optionally with an identity (OAuth2 refresh) token."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:
        token = "None" if self.identity_token is None else "'<redacted>'"
        return f"Credentials(username={self.username!r}, password='<redacted>', identity_token={token})"

    __str__ = __repr__


@attrs.frozen(repr=False)
class RegistryToken:
    """skopeo ``--registry-token``: a bearer token sent as it is (``DockerBearerRegistryToken``)."""

    token: str

    def __repr__(self) -> str:
        return "RegistryToken('<redacted>')"

    __str__ = __repr__
