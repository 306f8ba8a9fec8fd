"""``image-proxy cache verify|prune|du``: look after a ``--blob-cache`` directory from outside the proxy.

Safe beside running proxies:

- ``DIR/blobs`` and ``DIR/blobs/<algo>`` are opened without following symlinks, and every later access is relative
  to those directory descriptors: nothing outside DIR is read, and no symlink is followed or removed.
- A partial whose lock is held belongs to a download in progress: it is never removed. Whatever is removed is
  first checked to be the very file that was looked at (same inode; a partial is removed holding its lock).
- Blobs are read with ``O_NOATIME`` where allowed, so ``verify`` does not disturb the least-recently-used order.

``verify`` reports as ``unsafe`` what the proxy refuses or does not trust: a symbolic link anywhere under
``blobs/`` (the proxy never follows, writes or removes it, and streams that blob uncached), and a blob or partial
that is hard-linked, owned by another user than ``blobs/``'s owner, or group- or other-writable (its verification
stamp proves nothing: the proxy re-hashes it before every use, and never writes a hard-linked partial). ``--repair``
leaves them alone: they are someone's doing, to be looked at.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxy.cache.directory import (
    CacheDir,
    CacheDirError,
    Changed,
    Entry,
    Kind,
)
from proxy.cache.files import STAMP_XATTR, hash_fd, write_stamp
from proxy.commands.units import format_size

DEFAULT_STALE_AFTER = 24 * 3600.0

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

ProblemKind = Literal["corrupt", "stale-partial", "foreign", "unsafe", "unreadable"]


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w``; a bare number is seconds."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (try 7d, 12h, 30m or 90s)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def _human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"


def _read_stamp(fd: int) -> tuple[int, int] | None:
    try:
        size, _, mtime = os.getxattr(fd, STAMP_XATTR).partition(b":")
        return int(size), int(mtime)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- verify


@dataclass
class Problem:
    path: str
    kind: ProblemKind
    detail: str
    action: str = ""  # with --repair: "removed", or why not

    def line(self) -> str:
        return f"{self.path}: {self.kind}: {self.detail}" + (f" [{self.action}]" if self.action else "")


@dataclass
class VerifyReport:
    blobs: int = 0
    blob_bytes: int = 0
    good: int = 0
    stamped: int = 0
    partials: int = 0
    in_progress: int = 0
    idle: int = 0
    removed: int = 0
    freed_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.problems)

    def summary(self) -> str:
        text = (
            f"{self.blobs} blobs, {self.blob_bytes} bytes ({format_size(self.blob_bytes, binary=True)}): "
            f"{self.count('corrupt')} corrupt, {self.count('unreadable')} unreadable; "
            f"{self.partials} partials: {self.in_progress} in progress, {self.idle} idle, "
            f"{self.count('stale-partial')} stale; {self.count('foreign')} foreign, {self.count('unsafe')} unsafe"
        )
        if self.removed:
            text += f"; removed {self.removed} ({self.freed_bytes} bytes)"
        return text


def verify(cache: CacheDir, *, repair: bool, stale_after: float, now: float) -> VerifyReport:
    report = VerifyReport()

    def problem(entry: Entry, kind: ProblemKind, detail: str) -> None:
        found = Problem(str(cache.path(entry)), kind, detail)
        report.problems.append(found)
        if not repair or kind in ("unreadable", "unsafe") or (kind == "foreign" and not entry.removable):
            return
        if not cache.writable:
            found.action = "not repaired: the cache is read-only"
            return
        try:
            cache.remove(entry)
        except Changed:
            found.action = "not removed: it changed meanwhile"
        except OSError as e:
            found.action = f"not removed: {e.strerror}"
        else:
            found.action = "removed"
            report.removed += 1
            report.freed_bytes += entry.size

    owner = os.fstat(cache.fd).st_uid  # the cache's user (the daemon's, under systemd's CacheDirectory=)
    for entry in cache.scan():
        if entry.is_symlink:
            problem(entry, "unsafe", "a symbolic link: never followed, written or removed; that blob is not cached")
            continue
        if entry.kind == "foreign":
            problem(entry, "foreign", entry.why + ("" if entry.removable else "; never removed"))
            continue
        why_unsafe = _untrusted(entry, owner)
        if why_unsafe:
            problem(entry, "unsafe", why_unsafe)
        if entry.kind == "blob":
            _verify_blob(cache, entry, report, problem)
        else:
            _verify_partial(cache, entry, report, problem, stale_after, now)
    return report


def _untrusted(entry: Entry, owner: int) -> str:
    """Why the proxy does not trust this blob or partial ("" when it does)."""
    reasons = []
    if entry.nlink > 1:
        reasons.append(f"hard-linked ({entry.nlink} names)")
    if entry.uid != owner:
        reasons.append(f"owned by uid {entry.uid}, not by uid {owner} (the owner of blobs/)")
    if entry.mode & (stat.S_IWGRP | stat.S_IWOTH):
        reasons.append(f"group- or other-writable (mode {stat.S_IMODE(entry.mode):04o})")
    if not reasons:
        return ""
    if entry.kind == "partial" and entry.nlink > 1:
        return ", ".join(reasons) + ": the proxy never writes it"
    return ", ".join(reasons) + ": its stamp proves nothing, the proxy re-hashes it before every use"


def _verify_blob(cache: CacheDir, entry: Entry, report: VerifyReport, problem: Callable[..., None]) -> None:
    try:
        fd = cache.open(entry)
    except Changed:
        return
    except OSError as e:
        problem(entry, "unreadable", e.strerror or str(e))
        return
    try:
        report.blobs += 1
        before = os.fstat(fd)
        report.blob_bytes += before.st_size
        try:
            actual = hash_fd(fd, entry.algo)[0].hexdigest()
        except OSError as e:
            problem(entry, "unreadable", e.strerror or str(e))
            return
        if actual == entry.hexpart:
            report.good += 1
            after = os.fstat(fd)
            unchanged = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
            stamp = _read_stamp(fd)
            if cache.writable and unchanged and stamp != (after.st_size, after.st_mtime_ns) and write_stamp(fd, after):
                report.stamped += 1
            return
        detail = f"does not match its digest (its {before.st_size} bytes are {entry.algo}:{actual[:16]}...)"
        stamp = _read_stamp(fd)
        if stamp is not None and stamp[0] != before.st_size:
            how = "truncated" if before.st_size < stamp[0] else "grown"
            detail = f"{how}: {before.st_size} bytes, {stamp[0]} when verified; " + detail
        problem(entry, "corrupt", detail)
    finally:
        os.close(fd)


def _verify_partial(
    cache: CacheDir,
    entry: Entry,
    report: VerifyReport,
    problem: Callable[..., None],
    stale_after: float,
    now: float,
) -> None:
    try:
        fd = cache.lock_partial(entry)
    except Changed:
        return
    except OSError as e:
        problem(entry, "unreadable", e.strerror or str(e))
        return
    report.partials += 1
    if fd is None:
        report.in_progress += 1
        return
    try:  # the lock is held while it is judged and removed: no download can take it meanwhile
        age = now - os.fstat(fd).st_mtime
        if age <= stale_after:
            report.idle += 1
            return
        problem(entry, "stale-partial", f"unfinished download, nobody holds its lock, untouched for {_human_age(age)}")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- prune


@dataclass
class Removal:
    path: str
    kind: Kind
    size: int
    reason: str
    outcome: str = "removed"  # or "would be removed" (--dry-run), or why it was kept


@dataclass
class PruneReport:
    removals: list[Removal] = field(default_factory=list)
    freed_bytes: int = 0
    remaining_bytes: int = 0
    in_progress: int = 0
    failed: int = 0

    def summary(self, dry_run: bool, max_size: int | None) -> str:
        done = [r for r in self.removals if r.outcome in ("removed", "would be removed")]
        verb = "would be removed, would free" if dry_run else "removed, freed"
        text = (
            f"{len(done)} {verb} {self.freed_bytes} bytes ({format_size(self.freed_bytes, binary=True)}); "
            f"{self.remaining_bytes} bytes ({format_size(self.remaining_bytes, binary=True)}) left"
        )
        if self.in_progress:
            text += f", including {self.in_progress} downloads in progress"
        if max_size is not None and self.remaining_bytes > max_size:
            text += f"; still over {max_size} bytes"
        return text


def prune(cache: CacheDir, *, older_than: float | None, max_size: int | None, now: float, dry_run: bool) -> PruneReport:
    """Remove blobs unused (atime) and unlocked partials unwritten (mtime) for ``older_than`` seconds, then the least
    recently used of them until the blobs and partials total at most ``max_size`` bytes."""
    report = PruneReport()
    entries = [e for e in cache.scan() if e.kind != "foreign"]
    report.remaining_bytes = sum(e.size for e in entries)

    def last_used(entry: Entry) -> int:
        return entry.atime_ns if entry.kind == "blob" else entry.mtime_ns

    for entry in sorted(entries, key=last_used):
        idle = now - last_used(entry) / 1e9
        if older_than is not None and idle > older_than:
            reason = f"unused for {_human_age(idle)}"
        elif max_size is not None and report.remaining_bytes > max_size:
            reason = f"least recently used (unused for {_human_age(idle)}), the cache is over {max_size} bytes"
        else:
            break  # oldest first: every later one is newer, and the total only went down
        removal = Removal(str(cache.path(entry)), entry.kind, entry.size, reason)
        outcome = _remove(cache, entry, dry_run)
        if outcome is None:
            removal.outcome = "would be removed" if dry_run else "removed"
            report.freed_bytes += entry.size
            report.remaining_bytes -= entry.size
        else:
            removal.outcome = outcome
            if outcome.startswith("download in progress"):
                report.in_progress += 1
            elif not outcome.startswith("used since"):
                report.failed += 1
        report.removals.append(removal)
    return report


def _remove(cache: CacheDir, entry: Entry, dry_run: bool) -> str | None:
    """None when removed (or removable, with ``dry_run``), else why it was kept."""
    fd = None
    try:
        if entry.kind == "partial":
            fd = cache.lock_partial(entry)
            if fd is None:
                return "download in progress: kept"
        if not dry_run:
            cache.remove(entry, same_atime=entry.kind == "blob")
    except Changed:
        return "used since the scan (or replaced): kept"
    except OSError as e:
        return f"cannot remove it: {e.strerror}"
    finally:
        if fd is not None:
            os.close(fd)
    return None


# ---------------------------------------------------------------------------------------------------- du


def disk_usage(cache: CacheDir) -> dict[str, Any]:
    per_algo: dict[str, dict[str, int]] = {}
    foreign = {"count": 0, "bytes": 0}
    for entry in cache.scan():
        if entry.kind == "foreign":
            foreign["count"] += 1
            foreign["bytes"] += entry.size
            continue
        counts = per_algo.setdefault(entry.algo, {"blobs": 0, "blob_bytes": 0, "partials": 0, "partial_bytes": 0})
        plural = "blobs" if entry.kind == "blob" else "partials"
        counts[plural] += 1
        counts[f"{entry.kind}_bytes"] += entry.size
    total = {
        key: sum(c[key] for c in per_algo.values()) for key in ("blobs", "blob_bytes", "partials", "partial_bytes")
    }
    return {"dir": str(cache.root), "algorithms": per_algo, "total": total, "foreign": foreign}


def _usage_line(label: str, c: dict[str, int]) -> str:
    return (
        f"{label:<8} {c['blobs']:>6} blobs {c['blob_bytes']:>14} bytes ({format_size(c['blob_bytes'], binary=True)}), "
        f"{c['partials']:>4} partials {c['partial_bytes']:>14} bytes ({format_size(c['partial_bytes'], binary=True)})"
    )


# ---------------------------------------------------------------------------------------------------- command line

HELP = """\
Check, prune and measure a blob cache made by `serve --blob-cache DIR`. The cache directory is given as the
DIR argument or with --blob-cache DIR (the serve flag), before or after the action. Running proxies may keep
using the cache meanwhile: a partial whose download is in progress (its lock is held) is never removed, and
nothing outside DIR is read or removed (symbolic links are reported, never followed or removed).

exit status: 0 success (verify: no problem found); 1 verify found problems (even if --repair fixed them all:
the report says what was removed) or prune / --repair could not remove something (read-only cache, permission);
2 usage error, or DIR missing, unreadable or not a blob cache.
"""
VERIFY_HELP = """\
Re-hash every blob of the cache and report what is wrong: a blob whose bytes do not match its name (corrupt), a
partial download nobody holds and nobody touched for --stale-after (stale), and files that are not the cache's
(foreign). With --repair those are removed; a partial in use by a running proxy never is.

exit status: 0 nothing found; 1 problems found (even if --repair removed them all) or something could not be
removed; 2 usage error, or DIR missing, unreadable or not a blob cache.

examples:
  image-proxy cache verify /var/cache/image-proxy
  image-proxy cache verify --repair --blob-cache ~/.cache/image-proxy
"""
PRUNE_HELP = """\
Remove blobs and partial downloads: those unused for --older-than, then the least recently used until what is
left totals at most --max-size. A partial in use by a running proxy is never removed.

exit status: 0 done; 1 something could not be removed; 2 usage error, or DIR missing or not a blob cache.

examples:
  image-proxy cache prune --older-than 7d /var/cache/image-proxy
  image-proxy cache prune --max-size 10G --dry-run /var/cache/image-proxy
"""
DU_HELP = """\
How much the cache holds: bytes and counts of complete blobs and of partial downloads, per digest algorithm.

examples:
  image-proxy cache du /var/cache/image-proxy
  image-proxy cache du --json --blob-cache ~/.cache/image-proxy
"""


def add_cache_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    byte_size: Callable[[str], int],
) -> None:
    """Register ``cache verify|prune|du`` (``byte_size`` parses ``--max-size``, as ``--blob-cache-max``)."""
    fmt = argparse.RawDescriptionHelpFormatter
    cache = sub.add_parser(
        "cache", help="verify, prune or measure a --blob-cache directory", description=HELP, formatter_class=fmt
    )
    cache.add_argument("--blob-cache", metavar="DIR", default=argparse.SUPPRESS, help="the cache directory")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    verify_p = actions.add_parser(
        "verify",
        help="re-hash every blob; report corrupt blobs, stale partials and foreign files",
        description=VERIFY_HELP.split("\n\n", 1)[0],
        epilog=VERIFY_HELP.split("\n\n", 1)[1],
        formatter_class=fmt,
    )
    verify_p.add_argument(
        "--repair",
        action="store_true",
        help="remove corrupt blobs, stale partials and foreign regular files in blobs/<algo>/",
    )
    verify_p.add_argument(
        "--stale-after",
        type=parse_duration,
        default=DEFAULT_STALE_AFTER,
        metavar="DURATION",
        help="an unlocked partial untouched for longer is stale (default 24h)",
    )
    prune_p = actions.add_parser(
        "prune",
        help="remove blobs unused for a while and/or the least recently used",
        description=PRUNE_HELP.split("\n\n", 1)[0],
        epilog=PRUNE_HELP.split("\n\n", 1)[1],
        formatter_class=fmt,
    )
    prune_p.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="remove blobs not read and partials not written for DURATION (7d, 12h, 30m, 90s)",
    )
    prune_p.add_argument(
        "--max-size",
        type=byte_size,
        metavar="SIZE",
        help="then remove the least recently used until blobs and partials total at most SIZE (20G, 512M)",
    )
    prune_p.add_argument("-n", "--dry-run", action="store_true", help="say what would be removed; remove nothing")
    du_p = actions.add_parser(
        "du",
        help="bytes and counts of blobs and partials per algorithm",
        description=DU_HELP.split("\n\n", 1)[0],
        epilog=DU_HELP.split("\n\n", 1)[1],
        formatter_class=fmt,
    )
    for p in (verify_p, prune_p, du_p):
        p.add_argument("dir", nargs="?", metavar="DIR", help="the cache directory (or --blob-cache DIR)")
        p.add_argument("--blob-cache", metavar="DIR", default=argparse.SUPPRESS, help="the cache directory")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _cache_root(args: argparse.Namespace) -> Path:
    given = {d for d in (args.dir, getattr(args, "blob_cache", None)) if d is not None}
    if not given:
        raise CacheDirError("give the cache directory: DIR or --blob-cache DIR")
    if len(given) > 1:
        raise CacheDirError(f"DIR and --blob-cache name different directories: {' and '.join(sorted(given))}")
    return Path(given.pop())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def run_cache(args: argparse.Namespace) -> int:
    name = f"image-proxy cache {args.cache_command}"
    if args.cache_command == "prune" and args.older_than is None and args.max_size is None:
        print(f"{name}: give --older-than DURATION and/or --max-size SIZE", file=sys.stderr)
        return 2
    try:
        with CacheDir(_cache_root(args)) as cache:
            return _run(cache, args, name)
    except CacheDirError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2


def _run(cache: CacheDir, args: argparse.Namespace, name: str) -> int:
    if args.cache_command == "du":
        usage = disk_usage(cache)
        if args.json:
            _print_json(usage)
        else:
            for algo, counts in sorted(usage["algorithms"].items()):
                print(_usage_line(algo, counts))
            print(_usage_line("total", usage["total"]))
            if usage["foreign"]["count"]:
                print(f"foreign  {usage['foreign']['count']} entries, {usage['foreign']['bytes']} bytes")
        return 0

    if args.cache_command == "verify":
        if args.repair and not cache.writable:
            print(f"{name}: {cache.blobs} is read-only: reporting only, nothing can be repaired", file=sys.stderr)
        report = verify(cache, repair=args.repair, stale_after=args.stale_after, now=time.time())
        if args.json:
            _print_json({"dir": str(cache.root), "writable": cache.writable, **asdict(report)})
        else:
            for found in report.problems:
                print(found.line())
            print(report.summary())
        return 1 if report.problems else 0

    if not cache.writable and not args.dry_run:
        print(f"{name}: {cache.blobs} is read-only: nothing can be removed", file=sys.stderr)
        return 1
    pruned = prune(cache, older_than=args.older_than, max_size=args.max_size, now=time.time(), dry_run=args.dry_run)
    if args.json:
        _print_json({"dir": str(cache.root), "dry_run": args.dry_run, **asdict(pruned)})
    else:
        for r in pruned.removals:
            print(f"{r.path}: {r.outcome} ({r.size} bytes): {r.reason}")
        print(pruned.summary(args.dry_run, args.max_size))
    return 1 if pruned.failed else 0
