"""Message types of the protocol: one request packet, one reply packet."""

from __future__ import annotations

from typing import Any

import attrs

from protocol.errors import ErrorCode


@attrs.frozen
class Request:
    """``{"method": ..., "args": [...]}``. ``args`` is never None after decoding.

    ``id`` is the request-ids extension (docs/PROTOCOL.md): None for a plain in-order request.
    """

    method: str
    args: list[Any] = attrs.field(factory=list)
    id: int | None = None


@attrs.frozen
class Reply:
    """A reply packet. Always encoded with all five keys, in the Go server's order, and a sixth, ``id``, when
    it answers a request that carried one (the request-ids extension)."""

    success: bool
    value: Any = None
    pipeid: int = 0
    error_code: ErrorCode = ErrorCode.NONE
    error: str = ""
    id: int | None = None

    @classmethod
    def ok(cls, value: Any = None, pipeid: int = 0) -> Reply:
        return cls(success=True, value=value, pipeid=pipeid)

    @classmethod
    def failure(cls, error: str, code: ErrorCode = ErrorCode.OTHER) -> Reply:
        return cls(success=False, error=error, error_code=code)
