"""The blobs clients are getting: each transfer is tracked while it goes (``image-proxy status``), counted when it
ends (``image_proxy_blob_bytes_total``) and described in one info line: who, what, how much, from where, with
which resumes, how long, and how it ended (ok, the error, or the client went away)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from protocol.errors import ErrorCode, ProxyError
from proxy.server.metrics import STATS, Transfer, now

log = logging.getLogger("image-proxy.transfers")


async def tracked(transfer: Transfer, blob: object, work: Callable[[], Awaitable[ProxyError | None]]) -> None:
    """Run ``work`` (a producer sending ``blob`` into a client's pipe; it returns the error its client is told, or
    None) as ``transfer``: in flight meanwhile, then counted and logged. Cancelled: the connection ended first."""
    transfer.blob = blob
    transfer.origin = getattr(blob, "origin", "local")
    STATS.begin(transfer)
    outcome, error = "gone", None
    try:
        error = await work()
        if error is None:
            outcome = "ok"
        elif error.code is ErrorCode.EPIPE:
            outcome = "gone"
        else:
            outcome = "error"
    finally:
        STATS.end(transfer, outcome)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", describe(transfer, outcome, error))


_ORIGINS = {"network": "the network", "cache": "the cache", "local": "a local image"}


def _rate(count: int, seconds: float) -> str:
    if seconds <= 0:
        return ""
    per_second = count / seconds
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if per_second >= size:
            return f", {per_second / size:.1f} {unit}"
    return f", {per_second:.0f} B/s"


def describe(transfer: Transfer, outcome: str, error: ProxyError | None) -> str:
    """The transfer's log line (never a credential: references, digests, host names, byte counts and the error
    text clients are told)."""
    seconds = now() - transfer.started
    who = f"{transfer.client}: " if transfer.client is not None else ""
    if outcome == "ok":
        ended = "ok"
    elif outcome == "error":
        ended = f"failed: {error.message if error is not None else 'unknown error'}"
    elif error is not None:
        ended = "the client went away (broken pipe)"
    else:
        ended = "the client went away (the connection ended first)"
    total = f" of {transfer.total}" if transfer.total >= 0 and transfer.sent != transfer.total else ""
    line = (
        f"{who}{transfer.method} {transfer.reference} {transfer.digest}: {ended}; "
        f"{transfer.sent}{total} bytes to the client in {seconds:.2f} s{_rate(transfer.sent, seconds)}, "
        f"from {_ORIGINS.get(transfer.origin, transfer.origin)}"
    )
    fetch = transfer.fetch
    if fetch is not None:
        resumes = ""
        if fetch.resumes:
            resumes = f", {fetch.resumes} resume{'s' if fetch.resumes != 1 else ''} ({'; '.join(fetch.causes)})"
        line += f" ({', '.join(fetch.hosts)}: {fetch.received} bytes received{resumes})"
    return line


__all__ = ["describe", "tracked"]
