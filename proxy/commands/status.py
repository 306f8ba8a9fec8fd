"""``image-proxy status [--proxy-socket PATH] [--json]``: what a running daemon is doing, asked over its socket
(GetStatus, docs/PROTOCOL.md): its connections, the transfers in flight (which blob, from which host, how far,
since when nothing came), the blob cache, the limits and the uptime, as tables like ``podman ps``; ``--json``
prints the daemon's document as it came.

Other users' connections and transfers are shown only to the daemon's own user and to root; anyone else sees
their own and the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import trio

from protocol.errors import ProxyError

#: the GetCapabilities name of GetStatus
STATUS_EXTENSION = "status"
#: the largest status document read (a daemon at its connection limit with every pipe in use is far below it)
MAX_DOCUMENT = 64 << 20
#: the whole exchange (connect, GetStatus, its pipe) must be done within this
DEADLINE = 30.0


def add_status_parser(sub: argparse._SubParsersAction, default_socket: str) -> None:
    p = sub.add_parser(
        "status",
        help="what a running daemon is doing: connections, transfers in flight, cache, limits, uptime",
        description="Ask a running image-proxy daemon what it is doing (its GetStatus extension).",
    )
    p.add_argument(
        "--proxy-socket", metavar="PATH", default=default_socket, help=f"the daemon's socket (default {default_socket})"
    )
    p.add_argument("--json", action="store_true", help="print the daemon's JSON document as it came")


async def fetch_status(path: str) -> dict[str, Any]:
    """The daemon's status document (raises ProxyError: no daemon there, or one without the extension)."""
    from protocol.client import ImageProxy
    from protocol.fds import close_fds

    with trio.fail_after(DEADLINE):
        async with ImageProxy.connect(path) as proxy:
            if STATUS_EXTENSION not in await proxy.get_capabilities():
                raise ProxyError(
                    f"the proxy at {path} has no GetStatus (it is not an image-proxy daemon, or an older one)"
                )
            reply, fds = await proxy.call("GetStatus", [])
            if not reply.success or len(fds) != 1:
                close_fds(fds)
                raise ProxyError(f"GetStatus: {reply.error or 'no pipe in the reply'}", reply.error_code)
            chunks: list[bytes] = []

            async def read() -> None:
                size = 0
                async with trio.lowlevel.FdStream(fds[0]) as stream:
                    while chunk := await stream.receive_some(1 << 20):
                        size += len(chunk)
                        if size > MAX_DOCUMENT:
                            raise ProxyError(f"GetStatus: the document exceeds {MAX_DOCUMENT} bytes")
                        chunks.append(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await proxy.finish_pipe(reply.pipeid)
    try:
        document = json.loads(b"".join(chunks))
    except ValueError as e:
        raise ProxyError(f"GetStatus: the document is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ProxyError("GetStatus: the document is not a JSON object")
    return document


# ---------------------------------------------------------------------------------------------- the tables


def size(n: int | None) -> str:
    if n is None or n < 0:
        return "?"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart, the last one unpadded (as ``podman ps``)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return lines


def short_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest


def render(doc: dict[str, Any]) -> str:
    out = [
        f"image-proxy {doc.get('version', '?')}, pid {doc.get('pid', '?')}, up {duration(doc.get('uptime_seconds'))} "
        f"(since {doc.get('started', '?')}); showing {doc.get('details', '?')}",
        "",
    ]
    connections = doc.get("connections") or {}
    shown = connections.get("shown") or []
    out.append(f"CONNECTIONS: {connections.get('count', len(shown))}")
    if shown:
        rows = [
            [
                str(c.get("pid")) + (" (you)" if c.get("you") else ""),
                str(c.get("uid")),
                c.get("unit") or "-",
                duration(c.get("seconds")),
                str(c.get("requests")),
                str(c.get("open_images")),
                str(c.get("open_pipes")),
            ]
            for c in shown
        ]
        out += table(["PID", "UID", "UNIT", "CONNECTED", "REQUESTS", "IMAGES", "PIPES"], rows)
    out.append("")
    transfers = doc.get("transfers") or {}
    shown = transfers.get("shown") or []
    out.append(f"TRANSFERS IN FLIGHT: {transfers.get('count', len(shown))}")
    if shown:
        rows = []
        for t in shown:
            upstream = t.get("upstream") or {}
            hosts = ", ".join(upstream.get("hosts") or []) or t.get("source", "?")
            total = t.get("bytes_total")
            rows.append(
                [
                    str(t.get("pid")),
                    t.get("image", "?"),
                    short_digest(t.get("digest", "?")),
                    f"{size(t.get('bytes_sent'))} / {size(total)}",
                    f"{size(t.get('bytes_per_second'))}/s",
                    duration(t.get("seconds_since_last_byte")),
                    str(upstream.get("resumes", 0)),
                    hosts,
                    t.get("state", "?"),
                ]
            )
        out += table(["PID", "IMAGE", "DIGEST", "SENT", "RATE", "IDLE", "RESUMES", "FROM", "STATE"], rows)
    out.append("")
    cache = doc.get("cache")
    if cache is None:
        out.append("CACHE: off")
    else:
        limit = f" of {size(cache.get('max_bytes'))}" if cache.get("max_bytes") else ""
        out.append(
            f"CACHE: {cache.get('dir')}: {size(cache.get('bytes'))}{limit}, {cache.get('hits')} hits, "
            f"{cache.get('misses')} misses" + (" (read-only)" if cache.get("read_only") else "")
        )
    limits = doc.get("limits") or {}
    per = limits.get("connection") or {}
    wide = limits.get("daemon") or {}

    def limit(value: Any) -> str:
        return "no limit" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    out.append(
        f"LIMITS: per connection {limit(per.get('open_images'))} images, {limit(per.get('open_pipes'))} pipes, "
        f"{limit(per.get('requests_per_second'))} requests/s; daemon {limit(wide.get('connections'))} connections "
        f"({limit(wide.get('connections_per_uid'))} per uid), {limit(wide.get('open_pipes_per_uid'))} pipes per uid"
    )
    totals = doc.get("totals") or {}
    sent = totals.get("blob_bytes") or {}
    out.append(
        f"SO FAR: {totals.get('requests')} requests ({totals.get('failed_requests')} failed), blobs sent "
        f"{size(sent.get('network'))} from the network, {size(sent.get('cache'))} from the cache, "
        f"{size(sent.get('local'))} local; {totals.get('resumes')} resumes, {totals.get('stalls')} stalls, "
        f"{totals.get('mirror_fallbacks')} mirror fallbacks"
    )
    return "\n".join(out)


def run_status(args: argparse.Namespace) -> int:
    try:
        document = trio.run(fetch_status, args.proxy_socket)
    except ProxyError as e:
        print(f"image-proxy status: {e.message}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print(f"image-proxy status: no answer from {args.proxy_socket} within {DEADLINE:g} s", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2) if args.json else render(document))
    return 0


__all__ = ["add_status_parser", "fetch_status", "render", "run_status"]
