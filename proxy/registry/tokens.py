"""Bearer tokens as token servers answer them, pure: the JSON answer parsed into a token and its expiry."""

from __future__ import annotations

import datetime
import json

import attrs

#: distribution's minimum token lifetime; also the default when ``expires_in`` is missing
MIN_TOKEN_LIFETIME = 60.0


# -- tokens ----------------------------------------------------------------------------------------------------


@attrs.frozen
class Token:
    """A bearer token and the wall-clock second (``clock()``) from which it should no longer be used."""

    value: str = attrs.field(repr=False)
    expires_at: float
    #: an OAuth2 refresh token from the answer (kept, not used yet)
    refresh_token: str | None = attrs.field(default=None, repr=False)


def _parse_issued_at(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    cleaned = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    # fromisoformat wants at most 6 fractional digits; Go writes 9
    head, dot, tail = cleaned.partition(".")
    if dot:
        digits = len(tail) - len(tail.lstrip("0123456789"))
        tail = tail[: min(digits, 6)] + tail[digits:]
        cleaned = f"{head}.{tail}"
    try:
        moment = datetime.datetime.fromisoformat(cleaned)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def parse_token_response(body: bytes, now: float) -> Token:
    """A token server's JSON answer. ``expires_in`` is raised to at least 60 s (missing: 60 s); ``issued_at`` is
    used when it is plausible (not in the future, not older than the lifetime), else ``now`` (clock skew).

    Raises ValueError (without the body's content: it may hold a token)."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the answer is not JSON ({type(e).__name__})") from None
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    value = answer.get("token") or answer.get("access_token")
    if not isinstance(value, str) or not value:
        raise ValueError("the answer has no token or access_token")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("the token holds characters a header cannot carry")
    expires_in = answer.get("expires_in")
    lifetime = MIN_TOKEN_LIFETIME
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        lifetime = max(float(expires_in), MIN_TOKEN_LIFETIME)
    issued = _parse_issued_at(answer.get("issued_at"))
    if issued is None or not now - lifetime <= issued <= now:
        issued = now
    refresh = answer.get("refresh_token")
    return Token(value, issued + lifetime, refresh if isinstance(refresh, str) and refresh else None)
