"""GetStatus (docs/PROTOCOL.md, extension ``status``): what this process is doing, as one JSON document: its
connections, the transfers in flight, the blob cache, the limits, the counters so far and the uptime.

Who sees what: every client the daemon serves (the allow-list admitted it) sees the counts, the cache, the limits
and the uptime, and the connections and transfers of its own uid; those of other users only the process's own
user and root see (their pids, images and digests are theirs). A spawned proxy's one client is its parent.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

import proxy
from proxy.server.limits import DaemonLimits
from proxy.server.metrics import STALLED_AFTER, STATS, Client, Transfer, now
from proxy.server.options import ProxyOptions

if TYPE_CHECKING:
    from proxy.cache.store import BlobStore

#: the cache's size is scanned again after this long even when this process stored and evicted nothing (another
#: process may have: ``image-proxy cache prune``); at once when it did (a scan stats every file of the cache)
CACHE_SCAN_INTERVAL = 10.0

#: cache root -> (when scanned, STATS.cache_changes then, its size)
_scanned: dict[str, tuple[float, int, int | None]] = {}


def _scan_size(root: Path) -> int | None:
    from proxy.cache.directory import CacheDir, CacheDirError

    try:
        with CacheDir(root) as cache:
            return sum(e.size for e in cache.scan() if e.kind in ("blob", "partial"))
    except (CacheDirError, OSError):
        return None


async def cache_bytes(store: BlobStore | None) -> int | None:
    """The bytes of blobs and partial downloads in the blob cache, None without a cache or when it cannot be read:
    scanned in a worker thread when this process stored or evicted a blob since the last scan, or
    :data:`CACHE_SCAN_INTERVAL` seconds passed."""
    if store is None:
        return None
    key = str(store.root)
    at = now()
    changes = STATS.cache_changes
    known = _scanned.get(key)
    if known is not None and known[1] == changes and at - known[0] < CACHE_SCAN_INTERVAL:
        return known[2]
    size = await trio.to_thread.run_sync(_scan_size, store.root)
    _scanned[key] = (at, changes, size)
    return size


def transfer_state(transfer: Transfer, at: float) -> str:
    """``stalled`` (nothing from the registry and nothing to the client for :data:`STALLED_AFTER` seconds),
    ``waiting for the registry`` (a download not answered yet), ``waiting for the client`` (bytes come, the client
    does not read them), ``idle`` (nothing moves, nothing from the network: a disk, a slow client) or
    ``transferring``."""
    fetch = transfer.fetch
    client_idle = at - transfer.last_sent >= STALLED_AFTER
    if fetch is not None and fetch.idle(at) >= STALLED_AFTER and client_idle:
        return "stalled"
    if not client_idle:
        return "transferring"
    if transfer.origin == "network" and fetch is None:
        return "waiting for the registry"
    return "waiting for the client" if fetch is not None else "idle"


def _client(client: Client | None) -> dict[str, Any]:
    if client is None:
        return {"pid": None, "uid": None, "unit": None}
    return {"pid": client.pid, "uid": client.uid, "unit": client.unit}


def _transfer(transfer: Transfer, at: float) -> dict[str, Any]:
    seconds = at - transfer.started
    fetch = transfer.fetch
    return {
        **_client(transfer.client),
        "method": transfer.method,
        "image": transfer.reference,
        "digest": transfer.digest,
        "bytes_sent": transfer.sent,
        "bytes_total": transfer.total,
        "bytes_per_second": round(transfer.sent / seconds) if seconds > 0 else 0,
        "seconds": round(seconds, 3),
        "seconds_since_last_byte": round(at - transfer.last_sent, 3),
        "source": transfer.origin,
        "state": transfer_state(transfer, at),
        "upstream": None
        if fetch is None
        else {
            "hosts": list(fetch.hosts),
            "bytes_received": fetch.received,
            "seconds_since_last_byte": round(fetch.idle(at), 3),
            "resumes": fetch.resumes,
            "resume_causes": list(fetch.causes),
        },
    }


def _connection(client: Client, asker: Client | None, at: float) -> dict[str, Any]:
    images, pipes = client.held() if client.held is not None else (None, None)
    return {
        **_client(client),
        "gid": client.gid,
        "seconds": round(at - client.since, 3),
        "requests": client.requests,
        "open_images": images,
        "open_pipes": pipes,
        "you": client is asker,
    }


def sees_everyone(asker: Client | None) -> bool:
    """Whether the asker sees other users' clients: the process's own user, root, or a spawned proxy's parent."""
    return asker is None or asker.uid in (0, os.geteuid())


async def document(
    options: ProxyOptions, store: BlobStore | None, asker: Client | None, daemon_limits: DaemonLimits
) -> bytes:
    """GetStatus's JSON document, for ``asker`` (None: the parent of a spawned proxy)."""
    cached = await cache_bytes(store)
    at = now()
    everyone = sees_everyone(asker)

    def shown(client: Client | None) -> bool:
        return everyone or (client is not None and asker is not None and client.uid == asker.uid)

    clients = list(STATS.clients)
    transfers = list(STATS.transfers)
    stats = STATS
    value = {
        "pid": os.getpid(),
        "version": proxy.__version__,
        "started": datetime.datetime.fromtimestamp(stats.started_wall, datetime.UTC).isoformat(timespec="seconds"),
        "uptime_seconds": round(stats.uptime, 3),
        "details": "all users" if everyone else "your uid only",
        "connections": {
            "count": len(clients),
            "shown": [_connection(c, asker, at) for c in clients if shown(c)],
        },
        "transfers": {
            "count": len(transfers),
            "shown": [_transfer(t, at) for t in transfers if shown(t.client)],
        },
        "cache": None
        if store is None
        else {
            "dir": str(store.root),
            "bytes": cached,
            "max_bytes": store.max_bytes,
            "read_only": store.read_only,
            "hits": stats.cache_hits,
            "misses": stats.cache_misses,
        },
        "limits": {"connection": attrs.asdict(options.limits), "daemon": attrs.asdict(daemon_limits)},
        "totals": {
            "requests": sum(stats.requests.values()),
            "failed_requests": sum(n for (_, outcome), n in stats.requests.items() if outcome != "ok"),
            "transfers": dict(stats.transfers_done),
            "blob_bytes": dict(stats.blob_bytes),
            "upstream_bytes": sum(stats.upstream_bytes.values()),
            "resumes": sum(stats.resumes.values()),
            "stalls": sum(stats.stalls.values()),
            "mirror_fallbacks": sum(stats.mirror_fallbacks.values()),
            "limit_refusals": dict(stats.limit_refusals),
        },
    }
    return json.dumps(value, indent=1).encode()


__all__ = ["cache_bytes", "document", "sees_everyone", "transfer_state"]
