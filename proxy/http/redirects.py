"""Following redirects ourselves (h11 does not), the way the distribution spec wants it.

- 301/302/303/307/308 are followed for GET and HEAD only; any other method gets the redirect response back.
- ``Authorization``, ``Proxy-Authorization`` and ``Cookie`` (what the caller meant for the first origin) are
  dropped as soon as the scheme, host or port changes, and stay dropped for the rest of the chain, even when it
  comes back to the first origin or another port or scheme of its host (a presigned storage URL must not see
  the registry token, S3 refuses requests that carry both, and a storage host must not be able to bounce a
  request to where the credentials are wanted). The pool adds the Proxy-Authorization of the proxy it uses for
  each hop itself.
- https -> http is refused; so are loops and more than ``max_hops`` redirects. The error names the chain.
"""

from __future__ import annotations

import contextlib

from .connection import Response
from .errors import HTTPError, InvalidURL, RedirectError
from .headers import HeaderInput, header_pairs, without
from .pool import ConnectionPool
from .url import URL

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: request headers meant for the first origin only
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
FOLLOWED_METHODS = frozenset({"GET", "HEAD"})
#: a redirect body up to this size is read so the connection can be reused; a larger one closes it
DRAIN_LIMIT = 64 * 1024


async def request_following_redirects(
    pool: ConnectionPool, method: str, url: str | URL, headers: HeaderInput = (), max_hops: int = 10
) -> Response:
    """Send ``method url`` through ``pool`` and follow redirects. Returns the final response (its ``url`` is
    where it came from, ``history`` the URLs before it); the caller must ``aclose()`` it (``async with``)."""
    method = method.upper()
    current = url if isinstance(url, URL) else URL.parse(url)
    pairs = header_pairs(headers)
    chain = [str(current)]
    for hop in range(max_hops + 1):
        response = await pool.send(method, current, pairs)
        if method not in FOLLOWED_METHODS or response.status not in REDIRECT_STATUSES:
            response.history = tuple(chain[:-1])
            return response
        location = response.headers.get("location")
        if location is None:
            response.history = tuple(chain[:-1])
            return response
        try:
            following = current.join(location)
        except InvalidURL as e:
            await response.abandon()
            raise RedirectError(f"invalid redirect Location {location!r} ({e})", chain) from e
        await _discard(response)
        chain.append(str(following))
        if current.scheme == "https" and following.scheme == "http":
            raise RedirectError("refusing to follow a redirect from https to http", chain)
        if str(following) in chain[:-1]:
            raise RedirectError("redirect loop", chain)
        if hop == max_hops:
            raise RedirectError(f"too many redirects (more than {max_hops})", chain)
        if following.origin != current.origin:
            pairs = without(pairs, *CREDENTIAL_HEADERS)
        current = following
    raise AssertionError("unreachable")  # pragma: no cover


async def _discard(response: Response) -> None:
    """Finish with a redirect response: read a small body so the connection can be reused. ``aclose`` closes
    the connection when the body was not read to its end (a large or unframed body, a failed read)."""
    length = response.content_length
    if length is not None and length <= DRAIN_LIMIT:
        with contextlib.suppress(HTTPError):
            await response.read_all(DRAIN_LIMIT)
    await response.aclose()
