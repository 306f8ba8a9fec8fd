"""Message types of the protocol: one request packet, one reply packet."""

from __future__ import annotations

from typing import Any

import attrs

from protocol.errors import ErrorCode


@attrs.frozen
class Request:
    """``{"method": ..., "args": [...]}``. ``args`` is never None after decoding."""

    method: str
    args: list[Any] = attrs.field(factory=list)


@attrs.frozen
class Reply:
    """A reply packet. Always encoded with all five keys, in the Go server's order.

    ``fd_count`` is not on the wire: it says how many file descriptors travel with the
    packet as SCM_RIGHTS (0, 1 for pipe replies, 2 for GetRawBlob).
    """

    success: bool
    value: Any = None
    pipeid: int = 0
    error_code: ErrorCode = ErrorCode.NONE
    error: str = ""

    @classmethod
    def ok(cls, value: Any = None, pipeid: int = 0) -> Reply:
        return cls(success=True, value=value, pipeid=pipeid)

    @classmethod
    def failure(cls, error: str, code: ErrorCode = ErrorCode.OTHER) -> Reply:
        return cls(success=False, error=error, error_code=code)
