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


class ProtocolViolation(ProxyError):
    """The peer sent something the protocol does not allow (bad JSON, bad arguments, ...).

    ``request_id`` is the id of the request it is about, when the request carried a valid one: its error
    reply then carries that id too.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.OTHER, request_id: int | None = None) -> None:
        super().__init__(message, code)
        self.request_id = request_id
