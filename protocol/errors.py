"""Error codes carried in replies (``error_code``) and on the GetRawBlob error fd (``code``)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The values of a reply's ``error_code`` (protocol 0.2.8)."""

    NONE = ""
    EPIPE = "EPIPE"
    RETRYABLE = "retryable"
    OTHER = "other"


class ProxyError(Exception):
    """An error that becomes a ``success: false`` reply.

    ``str(err)`` is the reply's ``error`` text; ``code`` its ``error_code``.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.OTHER) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return str(self)


# ---- the texts clients match on (the Go server's), written once

#: a write to a pipe whose reader went away, as Go names it (clients match on "broken pipe")
BROKEN_PIPE_TEXT = "write |1: broken pipe"


def size_mismatch(expected: int, got: int) -> ProxyError:
    """A blob that is not the size the client asked for (FinishPipe's text)."""
    return ProxyError(f"expected {expected} bytes in blob, got {got}")


def digest_mismatch(digest: str) -> ProxyError:
    """A blob whose bytes do not match its digest (FinishPipe's text)."""
    return ProxyError(f"corrupted blob, expecting {digest}")


class ProtocolViolation(ProxyError):
    """The peer sent something the protocol does not allow (bad JSON, bad arguments, ...).

    ``request_id`` is the id of the request it is about, when the request carried a valid one: its error
    reply then carries that id too.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.OTHER, request_id: int | None = None) -> None:
        super().__init__(message, code)
        self.request_id = request_id
