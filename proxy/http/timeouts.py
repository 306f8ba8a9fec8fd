"""Deadlines for each phase of an HTTP exchange."""

from __future__ import annotations

import attrs


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"timeout {attribute.name!r} must be > 0, got {value!r}")


@attrs.frozen
class Timeouts:
    """Seconds allowed for each phase; every one of them is a separate deadline.

    - ``connect``: DNS resolution and the TCP handshake (to the proxy, when there is one), and the proxy's
      answer to CONNECT.
    - ``tls``: the TLS handshake.
    - ``headers``: from the first byte of the request until the end of the response headers.
    - ``stall``: the longest wait for the next body byte; it starts again on every read, so a slow but moving
      transfer never times out, and a silent one always does.
    """

    connect: float = attrs.field(default=30.0, validator=_positive)
    tls: float = attrs.field(default=10.0, validator=_positive)
    headers: float = attrs.field(default=30.0, validator=_positive)
    stall: float = attrs.field(default=30.0, validator=_positive)
