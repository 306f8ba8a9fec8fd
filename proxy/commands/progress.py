"""Showing a pull's progress events (``protocol.client.pull``) to a person or a program.

- :class:`TerminalProgress`: on a terminal, a live area redrawn in place (at most 10 times a second): one bar per
  blob in flight with bytes, rate, and "stalled N s" while no byte comes; a total bar. Finished blobs, stalls
  that ended, and retries are printed above it as permanent lines, so the scroll-back tells what happened.
- :class:`PlainProgress`: the permanent lines only, for logs and pipes.
- :class:`JsonProgress`: one JSON object per line per event (``blob-progress`` at most every 0.25 s per blob).

Hand-written: ANSI "cursor up" and "erase line" are all it takes, and no bar library we looked at (tqdm, rich,
enlighten) draws several concurrent bars from a trio task without its own threads or a heavy dependency.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

import attrs

from protocol.client.pull import (
    BlobDescriptor,
    BlobFinished,
    BlobFlowing,
    BlobProgress,
    BlobRetrying,
    BlobSkipped,
    BlobStalled,
    BlobStarted,
    PullEvent,
    PullFinished,
    PullStarted,
)
from proxy.commands.proxy_access import short_digest
from proxy.commands.units import format_size

REDRAW_INTERVAL = 0.1
JSON_PROGRESS_INTERVAL = 0.25
#: the most bars drawn at once (more blobs in flight are summarised on one line)
MAX_BARS = 8

_UP = "\x1b[{}F"  # cursor to the start of the line N lines up
_ERASE = "\x1b[2K"  # erase the whole line


def _label(blob: BlobDescriptor, count: int) -> str:
    if blob.role == "config":
        return "config"
    return f"layer {blob.index + 1}/{count}"


def _rate(nbytes: int, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    return f"{format_size(int(nbytes / seconds))}/s"


@attrs.define
class _Bar:
    blob: BlobDescriptor
    done: int = 0
    started: float | None = None
    stalled_since: float | None = None
    attempt: int = 1
    finished: bool = False


class _Lines:
    """The permanent lines every human-readable renderer prints (without a live area)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.bars: dict[str, _Bar] = {}
        self.layers = 0
        self.total = 0
        self.started = now()

    def line_for(self, event: PullEvent) -> str | None:
        now = self.now()
        if isinstance(event, PullStarted):
            self.started = now
            self.total = event.total_bytes
            self.layers = sum(1 for b in event.blobs if b.role == "layer")
            self.bars = {b.digest: _Bar(b) for b in event.blobs}
            return (
                f"Pulling {event.reference}: manifest {event.manifest_digest}, "
                f"{self.layers} layer{'s' if self.layers != 1 else ''}, {format_size(event.total_bytes)}"
            )
        if isinstance(event, PullFinished):
            return (
                f"Pulled {format_size(event.fetched_bytes)} in {event.seconds:.1f} s "
                f"({_rate(event.fetched_bytes, event.seconds)})"
            )
        bar = self.bars.setdefault(event.blob.digest, _Bar(event.blob))
        label = f"{_label(event.blob, self.layers)} {short_digest(event.blob.digest)}"
        if isinstance(event, BlobStarted):
            bar.started, bar.done, bar.attempt, bar.stalled_since = now, 0, event.attempt, None
            return None
        if isinstance(event, BlobProgress):
            bar.done = event.done
            return None
        if isinstance(event, BlobStalled):
            bar.stalled_since = now - event.seconds
            return f"  {label}: no data for {event.seconds:.0f} s at {format_size(event.done)}; the proxy is resuming"
        if isinstance(event, BlobFlowing):
            bar.stalled_since = None
            return f"  {label}: data flowing again after {event.seconds:.1f} s, at {format_size(event.done)}"
        if isinstance(event, BlobRetrying):
            return f"  {label}: attempt {event.attempt} failed: {event.error}; retrying in {event.delay:.0f} s"
        if isinstance(event, BlobSkipped):
            bar.finished, bar.done = True, event.blob.size
            return f"  {label}: {format_size(event.blob.size)} already present"
        if isinstance(event, BlobFinished):
            bar.finished, bar.done = True, event.blob.size
            return (
                f"  {label}: {format_size(event.blob.size)} in {event.seconds:.1f} s "
                f"({_rate(event.blob.size, event.seconds)}), verified"
            )
        return None  # pragma: no cover


class PlainProgress:
    """Permanent lines only."""

    def __init__(self, stream: TextIO, now: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self._lines = _Lines(now)

    def __call__(self, event: PullEvent) -> None:
        line = self._lines.line_for(event)
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


class TerminalProgress:
    """Permanent lines, and below them a live area of bars redrawn in place."""

    def __init__(self, stream: TextIO, now: Callable[[], float] = time.monotonic, width: int | None = None) -> None:
        self.stream = stream
        self.now = now
        self._width = width
        self._lines = _Lines(now)
        self._drawn = 0
        self._last_draw = float("-inf")

    def __call__(self, event: PullEvent) -> None:
        line = self._lines.line_for(event)
        if line is not None:
            self._draw(permanent=line)
        elif self.now() - self._last_draw >= REDRAW_INTERVAL:
            self._draw()

    def tick(self) -> None:
        """Redraw (the stall counters move even when no event comes)."""
        self._draw()

    def close(self) -> None:
        self._clear_live_area()
        self.stream.flush()

    def _clear_live_area(self) -> None:
        if self._drawn:
            self.stream.write(_UP.format(self._drawn))
            self.stream.write((_ERASE + "\n") * self._drawn)
            self.stream.write(_UP.format(self._drawn))
            self._drawn = 0

    def _draw(self, permanent: str | None = None) -> None:
        width = self._width or shutil.get_terminal_size((100, 24)).columns
        now = self.now()
        self._last_draw = now
        lines = self._live_lines(now, width)
        out = []
        if self._drawn:
            out.append(_UP.format(self._drawn))
        if permanent is not None:
            out.append(_ERASE + permanent + "\n")  # may wrap: it scrolls away, and is never redrawn
        for text in lines:
            out.append(_ERASE + text[: width - 1] + "\n")
        # erase what is left of a taller previous drawing, then come back up to just under the new one
        leftover = self._drawn - len(lines) - (1 if permanent is not None else 0)
        if leftover > 0:
            out.append((_ERASE + "\n") * leftover)
            out.append(_UP.format(leftover))
        self._drawn = len(lines)
        self.stream.write("".join(out))
        self.stream.flush()

    def _live_lines(self, now: float, width: int) -> list[str]:
        state = self._lines
        if not state.bars:
            return []
        active = [b for b in state.bars.values() if b.started is not None and not b.finished]
        waiting = sum(1 for b in state.bars.values() if b.started is None and not b.finished)
        bar_width = max(10, min(30, width - 70))
        lines = []
        for bar in active[:MAX_BARS]:
            label = f"{_label(bar.blob, state.layers):<12} {short_digest(bar.blob.digest)}"
            amount = f"{format_size(bar.done)} / {format_size(bar.blob.size)}"
            if bar.stalled_since is not None:
                status = f"stalled {now - bar.stalled_since:.0f} s"
            else:
                status = _rate(bar.done, now - (bar.started or now))
            if bar.attempt > 1:
                status += f" (attempt {bar.attempt})"
            lines.append(f"  {label} {_bar(bar.done, bar.blob.size, bar_width)} {amount:>21}  {status}")
        if len(active) > MAX_BARS:
            lines.append(f"  ... {len(active) - MAX_BARS} more in flight")
        done = sum(b.done for b in state.bars.values())
        finished = sum(1 for b in state.bars.values() if b.finished)
        summary = f"{finished}/{len(state.bars)} blobs"
        if waiting:
            summary += f", {waiting} waiting"
        amount = f"{format_size(done)} / {format_size(state.total)}"
        lines.append(
            f"  {'total':<25} {_bar(done, state.total, bar_width)} {amount:>21}  "
            f"{_rate(done, now - state.started)}  {summary}"
        )
        return lines


def _bar(done: int, total: int, width: int) -> str:
    filled = width if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class JsonProgress:
    """One JSON object per line; ``blob-progress`` thinned to one per blob every 0.25 s."""

    def __init__(self, stream: TextIO, now: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.now = now
        self._last: dict[str, float] = {}

    def __call__(self, event: PullEvent) -> None:
        if isinstance(event, BlobProgress):
            now = self.now()
            if event.done < event.blob.size and now - self._last.get(event.blob.digest, float("-inf")) < (
                JSON_PROGRESS_INTERVAL
            ):
                return
            self._last[event.blob.digest] = now
        self.emit(event.as_json())

    def emit(self, doc: dict[str, Any]) -> None:
        self.stream.write(json.dumps(doc, separators=(",", ":")) + "\n")
        self.stream.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


class QuietProgress:
    def __call__(self, event: PullEvent) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


Progress = TerminalProgress | PlainProgress | JsonProgress | QuietProgress


def progress_for(stream: TextIO, *, json_events: bool, quiet: bool, json_stream: TextIO | None = None) -> Progress:
    """The renderer a command should use: quiet, JSON lines (to ``json_stream``), bars on a terminal, else lines."""
    if quiet:
        return QuietProgress()
    if json_events:
        return JsonProgress(json_stream or stream)
    if stream.isatty():
        return TerminalProgress(stream)
    return PlainProgress(stream)


__all__ = [
    "JsonProgress",
    "PlainProgress",
    "Progress",
    "QuietProgress",
    "TerminalProgress",
    "progress_for",
]
