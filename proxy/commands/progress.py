"""Showing a pull's progress events (``protocol.client.pull``) to a person or a program.

- :class:`TerminalProgress`: on a terminal, a live area (rich): one bar per blob in flight with bytes, rate, and
  "stalled N s" while no byte comes, and a total bar, in aligned columns. Finished blobs, stalls that ended, and
  retries are printed above it as permanent lines, so the scroll-back tells what happened.
- :class:`PlainProgress`: for logs and pipes: a ``Copying blob sha256:…`` line as each blob starts (as skopeo
  prints), then the permanent lines.
- :class:`JsonProgress`: one JSON object per line per event (``blob-progress`` at most every 0.25 s per blob), keys
  in snake_case as every ``--json`` of ours.
- :class:`BootcProgress`: ``copy --progress-fd N``: bootc's JSON-lines progress (``Start``, ``ProgressBytes``,
  ``ProgressSteps``), so a tool that drives ``bootc --progress-fd`` drives ``image-proxy copy`` the same way.

Sizes are in binary units (MiB), as skopeo, podman and ``image-proxy cache du`` show them. A blob the blob cache
holds part of from an earlier, interrupted run (``--blob-cache DIR``: the proxy resumes it from there) is shown as
resumed, and its resumed bytes are not counted as fetched.

The terminal renderer uses rich, imported only when a terminal is drawn on: the columns of the bars line up
whatever the labels, sizes and rates, and the terminal's width and the redrawing are rich's business.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
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
#: the most bars drawn at once (more blobs in flight are summarised on the total's line)
MAX_BARS = 8
#: the version of bootc's progress format written (``API_VERSION`` of bootc's crates/lib/src/progress_jsonl.rs)
BOOTC_PROGRESS_VERSION = "0.1.0"
#: bootc writes at most 5 events a second that may be dropped (byte counts); the others always
BOOTC_LOSSY_INTERVAL = 0.2

#: the bytes of a blob that an earlier run left for the proxy to resume from (0: it starts from zero)
Resumed = Callable[[BlobDescriptor], int]


def nothing_resumed(blob: BlobDescriptor) -> int:
    return 0


def partials_in(cache_dir: str | os.PathLike[str]) -> Resumed:
    """What the blob cache at ``cache_dir`` holds of each blob from an earlier run: the size of its partial file
    (``blobs/<algo>/<hex>.partial``), which the proxy's cache resumes from rather than fetch again (those bytes reach
    the client once the whole blob is verified). Read as each blob starts; an unreadable cache resumes nothing."""
    from proxy.cache.directory import PARTIAL_SUFFIX

    blobs = Path(cache_dir) / "blobs"

    def resumed(blob: BlobDescriptor) -> int:
        algorithm, _, hexpart = blob.digest.partition(":")
        try:
            st = os.lstat(blobs / algorithm / (hexpart + PARTIAL_SUFFIX))
        except (OSError, ValueError):
            return 0
        return min(st.st_size, blob.size) if stat.S_ISREG(st.st_mode) else 0

    return resumed


def _label(blob: BlobDescriptor, count: int) -> str:
    if blob.role == "config":
        return "config"
    return f"layer {blob.index + 1}/{count}"


def _rate(nbytes: int, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    return f"{format_size(int(nbytes / seconds))}/s"


@attrs.define
class _Blob:
    blob: BlobDescriptor
    done: int = 0  # bytes of this attempt received (resumed ones included, once they came)
    resumed: int = 0  # bytes of it the proxy resumes from the blob cache, as the attempt started
    started: float | None = None
    stalled_since: float | None = None
    attempt: int = 1
    finished: bool = False
    skipped: bool = False

    @property
    def fetched(self) -> int:
        """Bytes of this attempt that came over the network."""
        return max(0, self.done - self.resumed)


class _State:
    """What every renderer knows of the pull: the blobs, their progress, totals."""

    def __init__(self, now: Callable[[], float], resumed: Resumed) -> None:
        self.now = now
        self.resumed = resumed
        self.reference = ""
        self.manifest_digest = ""
        self.blobs: dict[str, _Blob] = {}
        self.layers = 0
        self.total = 0
        self.started = now()

    def blob(self, blob: BlobDescriptor) -> _Blob:
        return self.blobs.setdefault(blob.digest, _Blob(blob))

    def label(self, blob: BlobDescriptor) -> str:
        return f"{_label(blob, self.layers)} {short_digest(blob.digest)}"

    @property
    def resumed_bytes(self) -> int:
        return sum(b.resumed for b in self.blobs.values() if b.finished and not b.skipped)

    def update(self, event: PullEvent) -> None:
        now = self.now()
        if isinstance(event, PullStarted):
            self.started = now
            self.reference, self.manifest_digest = event.reference, event.manifest_digest
            self.total = event.total_bytes
            self.layers = sum(1 for b in event.blobs if b.role == "layer")
            self.blobs = {b.digest: _Blob(b) for b in event.blobs}
            return
        if isinstance(event, PullFinished):
            return
        state = self.blob(event.blob)
        if isinstance(event, BlobStarted):
            state.started, state.done, state.attempt, state.stalled_since = now, 0, event.attempt, None
            state.resumed = self.resumed(event.blob)
        elif isinstance(event, BlobProgress):
            state.done = event.done
        elif isinstance(event, BlobStalled):
            state.stalled_since = now - event.seconds
        elif isinstance(event, BlobFlowing):
            state.stalled_since = None
        elif isinstance(event, BlobSkipped):
            state.finished, state.skipped, state.done = True, True, event.blob.size
        elif isinstance(event, BlobFinished):
            state.finished, state.done = True, event.blob.size


def _line_for(state: _State, event: PullEvent, *, start_lines: bool) -> str | None:
    """The permanent line an event prints (after ``state.update(event)``), if any."""
    if isinstance(event, PullStarted):
        layers = state.layers
        return (
            f"Pulling {event.reference}: manifest {event.manifest_digest}, "
            f"{layers} layer{'s' if layers != 1 else ''}, {format_size(event.total_bytes)}"
        )
    if isinstance(event, PullFinished):
        resumed = state.resumed_bytes
        fetched = max(0, event.fetched_bytes - resumed)
        line = f"Pulled {format_size(fetched)} in {event.seconds:.1f} s ({_rate(fetched, event.seconds)})"
        if resumed:
            line += f"; {format_size(resumed)} more resumed from the blob cache"
        return line
    blob = state.blob(event.blob)
    label = state.label(event.blob)
    what = "config" if event.blob.role == "config" else "blob"
    if isinstance(event, BlobStarted):
        if not start_lines:
            return None
        line = f"Copying {what} {event.blob.digest}"
        if event.attempt > 1:
            line += f" (attempt {event.attempt})"
        if blob.resumed:
            line += f" (resuming: {format_size(blob.resumed)} of {format_size(event.blob.size)} in the blob cache)"
        return line
    if isinstance(event, BlobStalled):
        return f"  {label}: no data for {event.seconds:.0f} s at {format_size(event.done)}; the proxy is resuming"
    if isinstance(event, BlobFlowing):
        return f"  {label}: data flowing again after {event.seconds:.1f} s, at {format_size(event.done)}"
    if isinstance(event, BlobRetrying):
        return f"  {label}: attempt {event.attempt} failed: {event.error}; retrying in {event.delay:.0f} s"
    if isinstance(event, BlobSkipped):
        return f"Copying {what} {event.blob.digest} skipped: already present ({format_size(event.blob.size)})"
    if isinstance(event, BlobFinished):
        fetched = event.blob.size - blob.resumed
        line = (
            f"  {label}: {format_size(event.blob.size)} in {event.seconds:.1f} s "
            f"({_rate(fetched, event.seconds)}), verified"
        )
        if blob.resumed:
            line += f"; {format_size(blob.resumed)} of it resumed from the blob cache"
        return line
    return None


class PlainProgress:
    """A start line per blob, and the permanent lines."""

    def __init__(
        self, stream: TextIO, now: Callable[[], float] = time.monotonic, resumed: Resumed = nothing_resumed
    ) -> None:
        self.stream = stream
        self._state = _State(now, resumed)

    def __call__(self, event: PullEvent) -> None:
        self._state.update(event)
        line = _line_for(self._state, event, start_lines=True)
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    def copied(self, doc: dict[str, Any]) -> None:
        pass

    def failed(self, reference: str, error: str) -> None:
        pass


class TerminalProgress:
    """Permanent lines, and below them a live area of bars (rich), redrawn in place at most 10 times a second."""

    def __init__(
        self,
        stream: TextIO,
        now: Callable[[], float] = time.monotonic,
        width: int | None = None,
        resumed: Resumed = nothing_resumed,
    ) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        class Bars(Progress):
            """The blobs in the order they started, the total last."""

            def get_renderables(self):  # type: ignore[no-untyped-def]
                yield self.make_tasks_table(sorted(self.tasks, key=lambda task: task.fields["order"]))

        self.now = now
        self._state = _State(now, resumed)
        self.console = Console(file=stream, width=width, force_terminal=True, highlight=False, soft_wrap=True)
        self._bars = Bars(
            TextColumn("  {task.description}", markup=False),
            BarColumn(bar_width=30, finished_style="green"),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[status]}", markup=False),
            console=self.console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._tasks: dict[str, Any] = {}  # digest -> rich task id
        self._total: Any = None
        self._order = 0
        self._last_draw = float("-inf")
        self._running = False

    def __call__(self, event: PullEvent) -> None:
        state = self._state
        state.update(event)
        if isinstance(event, PullStarted):
            self._start()
        elif isinstance(event, BlobStarted):
            self._bar_for(event.blob)
        elif isinstance(event, (BlobFinished, BlobSkipped)):
            task = self._tasks.pop(event.blob.digest, None)
            if task is not None:
                self._bars.remove_task(task)
        line = _line_for(state, event, start_lines=False)
        if line is not None:
            self.console.print(line, markup=False, highlight=False)  # above the live area, which is redrawn
            self._draw()
        elif self.now() - self._last_draw >= REDRAW_INTERVAL:
            self._draw()

    def _start(self) -> None:
        if not self._running:
            self._bars.start()
            self._running = True
        self._total = self._bars.add_task("total", total=self._state.total or None, status="", order=sys.maxsize)

    def _bar_for(self, blob: BlobDescriptor) -> None:
        task = self._tasks.get(blob.digest)
        if task is None:
            self._order += 1
            task = self._bars.add_task(
                self._state.label(blob), total=blob.size or None, status="", order=self._order, visible=False
            )
            self._tasks[blob.digest] = task
        self._bars.update(task, completed=0)

    def tick(self) -> None:
        """Redraw (the stall counters move even when no event comes)."""
        self._draw()

    def close(self) -> None:
        if self._running:
            self._bars.stop()  # transient: the live area is erased, the permanent lines stay
            self._running = False
        self.console.file.flush()

    def copied(self, doc: dict[str, Any]) -> None:
        pass

    def failed(self, reference: str, error: str) -> None:
        pass

    def _draw(self) -> None:
        if not self._running:
            return
        now = self.now()
        self._last_draw = now
        state = self._state
        shown = 0
        for digest, task in self._tasks.items():
            blob = state.blobs[digest]
            if blob.stalled_since is not None:
                status = f"stalled {now - blob.stalled_since:.0f} s"
            else:
                status = _rate(blob.fetched, now - (blob.started or now))
            if blob.attempt > 1:
                status += f" (attempt {blob.attempt})"
            if blob.resumed:
                status += f", {format_size(blob.resumed)} resumed"
            visible = shown < MAX_BARS
            shown += visible
            self._bars.update(task, completed=blob.done, status=status, visible=visible)
        if self._total is not None:
            done = sum(b.done for b in state.blobs.values())
            fetched = sum(b.fetched for b in state.blobs.values() if not b.skipped)
            finished = sum(1 for b in state.blobs.values() if b.finished)
            waiting = sum(1 for b in state.blobs.values() if b.started is None and not b.finished)
            status = f"{_rate(fetched, now - state.started)}  {finished}/{len(state.blobs)} blobs"
            if len(self._tasks) > MAX_BARS:
                status += f", {len(self._tasks) - MAX_BARS} more in flight"
            if waiting:
                status += f", {waiting} waiting"
            self._bars.update(self._total, completed=done, status=status)
        self._bars.refresh()

    def live_text(self) -> list[str]:
        """The live area as plain text, one string per line (what the terminal shows under the permanent lines)."""
        from rich.console import Console

        self._draw()
        console = Console(
            file=io.StringIO(), width=self.console.width, color_system="standard", force_terminal=True, record=True
        )
        console.print(self._bars.get_renderable())
        return console.export_text(styles=False).rstrip("\n").split("\n")


class JsonProgress:
    """One JSON object per line; ``blob-progress`` thinned to one per blob every 0.25 s. A blob's ``resumed_bytes``
    (``blob-started``, ``blob-finished``, ``pull-finished``) are the bytes the proxy resumed from the blob cache."""

    def __init__(
        self, stream: TextIO, now: Callable[[], float] = time.monotonic, resumed: Resumed = nothing_resumed
    ) -> None:
        self.stream = stream
        self.now = now
        self._state = _State(now, resumed)
        self._last: dict[str, float] = {}

    def __call__(self, event: PullEvent) -> None:
        self._state.update(event)
        if isinstance(event, BlobProgress):
            now = self.now()
            if event.done < event.blob.size and now - self._last.get(event.blob.digest, float("-inf")) < (
                JSON_PROGRESS_INTERVAL
            ):
                return
            self._last[event.blob.digest] = now
        doc = event.as_json()
        if isinstance(event, (BlobStarted, BlobFinished)):
            doc["resumed_bytes"] = self._state.blob(event.blob).resumed
        elif isinstance(event, PullFinished):
            doc["resumed_bytes"] = self._state.resumed_bytes
        self.emit(doc)

    def emit(self, doc: dict[str, Any]) -> None:
        self.stream.write(json.dumps(doc, separators=(",", ":")) + "\n")
        self.stream.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    def copied(self, doc: dict[str, Any]) -> None:
        self.emit({"event": "copied", **doc})

    def failed(self, reference: str, error: str) -> None:
        self.emit({"event": "copy-failed", "reference": reference, "error": error})


class BootcProgress:
    """bootc's ``--progress-fd`` format, written to an open file: JSON lines of ``Start`` (once, first),
    ``ProgressBytes`` while blobs come (task ``pulling``), ``ProgressSteps`` while the image is written (task
    ``writing``). As bootc: byte counts at most 5 times a second, a finished blob and the end always; ``bytes`` and
    ``bytes_total`` leave out what is cached (blobs the destination holds, bytes resumed from the blob cache), which
    ``bytes_cached`` counts, so ``bytes == bytes_total`` when the pull is done; steps are layers. A write that fails
    (the reader went away) stops the writing with one warning; the copy goes on."""

    def __init__(
        self,
        stream: Any,
        now: Callable[[], float] = time.monotonic,
        resumed: Resumed = nothing_resumed,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """``stream``: a binary file (``--progress-fd``: the fd, opened for writing)."""
        self.stream: Any = stream
        self.now = now
        self._state = _State(now, resumed)
        self._warn = warn or (lambda text: print(text, file=sys.stderr))
        self._started = False
        self._last_lossy = float("-inf")
        self._fetching: list[str] = []  # digests of the blobs fetched (not skipped), in the order they started

    def _send(self, doc: dict[str, Any], *, required: bool) -> None:
        if self.stream is None:
            return
        if not self._started:
            self._started = True
            self._write({"type": "Start", "version": BOOTC_PROGRESS_VERSION})
        now = self.now()
        if not required and now - self._last_lossy < BOOTC_LOSSY_INTERVAL:
            return
        self._write(doc)
        self._last_lossy = now

    def _write(self, doc: dict[str, Any]) -> None:
        if self.stream is None:
            return
        line = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            self.stream.write(line.encode())
            self.stream.flush()
        except OSError as e:
            self._warn(f"image-proxy copy: --progress-fd: {e.strerror or e}; no more progress is written there")
            stream, self.stream = self.stream, None
            with contextlib.suppress(OSError):
                stream.close()

    def __call__(self, event: PullEvent) -> None:
        state = self._state
        state.update(event)
        if isinstance(event, BlobStarted) and event.blob.digest not in self._fetching:
            self._fetching.append(event.blob.digest)
        required = isinstance(event, (PullStarted, BlobFinished, BlobSkipped, PullFinished))
        if isinstance(event, BlobProgress | BlobStarted | BlobFinished | BlobSkipped | PullStarted | PullFinished):
            self._send(self._bytes(), required=required)
        if isinstance(event, PullFinished):
            self._send(self._writing(done=False), required=True)

    def _bytes(self) -> dict[str, Any]:
        state = self._state
        blobs = state.blobs.values()
        cached = sum(b.blob.size for b in blobs if b.skipped) + sum(b.resumed for b in blobs if not b.skipped)
        layers = [b for b in blobs if b.blob.role == "layer"]
        subtasks = []
        for digest in self._fetching:
            blob = state.blobs[digest]
            subtasks.append(
                {
                    "subtask": blob.blob.role,
                    "description": f"{_label(blob.blob, state.layers)}: {short_digest(digest)}",
                    "id": digest,
                    "bytesCached": blob.resumed,
                    "bytes": blob.done,
                    "bytesTotal": blob.blob.size,
                }
            )
        return {
            "type": "ProgressBytes",
            "task": "pulling",
            "description": f"Pulling {state.reference}",
            "id": state.manifest_digest,
            "bytesCached": cached,
            "bytes": sum(b.fetched for b in blobs if not b.skipped),
            "bytesTotal": max(0, state.total - cached),
            "stepsCached": sum(1 for b in layers if b.skipped),
            "steps": sum(1 for b in layers if b.finished and not b.skipped),
            "stepsTotal": sum(1 for b in layers if not b.skipped),
            "subtasks": subtasks,
        }

    def _writing(self, *, done: bool) -> dict[str, Any]:
        return {
            "type": "ProgressSteps",
            "task": "writing",
            "description": "Writing the image to its destination",
            "id": self._state.manifest_digest,
            "stepsCached": 0,
            "steps": 1 if done else 0,
            "stepsTotal": 1,
            "subtasks": [
                {"subtask": "writing", "description": "Writing manifest", "id": "manifest", "completed": done}
            ],
        }

    def tick(self) -> None:
        pass

    def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.flush()

    def copied(self, doc: dict[str, Any]) -> None:
        self._send(self._writing(done=True), required=True)

    def failed(self, reference: str, error: str) -> None:
        pass


class QuietProgress:
    def __call__(self, event: PullEvent) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    def copied(self, doc: dict[str, Any]) -> None:
        pass

    def failed(self, reference: str, error: str) -> None:
        pass


class Several:
    """Every event to each renderer (the one a person sees, and ``--progress-fd``'s)."""

    def __init__(self, *renderers: Any) -> None:
        self.renderers = renderers

    def __call__(self, event: PullEvent) -> None:
        for renderer in self.renderers:
            renderer(event)

    def tick(self) -> None:
        for renderer in self.renderers:
            renderer.tick()

    def close(self) -> None:
        for renderer in self.renderers:
            renderer.close()

    def copied(self, doc: dict[str, Any]) -> None:
        for renderer in self.renderers:
            renderer.copied(doc)

    def failed(self, reference: str, error: str) -> None:
        for renderer in self.renderers:
            renderer.failed(reference, error)


Progress = TerminalProgress | PlainProgress | JsonProgress | QuietProgress | BootcProgress | Several


def open_progress_fd(fd: int) -> Any:
    """The file ``--progress-fd N`` writes to; OSError naming the fd when it is not open for writing."""
    if fd <= 2:
        raise OSError(f"--progress-fd {fd}: use a descriptor other than stdin, stdout and stderr")
    import fcntl

    try:
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as e:
        raise OSError(f"--progress-fd {fd}: {e.strerror or e}") from None
    if access == os.O_RDONLY:
        raise OSError(f"--progress-fd {fd}: the descriptor is open for reading only")
    return os.fdopen(fd, "wb", buffering=0)


def progress_for(
    stream: TextIO,
    *,
    json_events: bool,
    quiet: bool,
    json_stream: TextIO | None = None,
    progress_file: Any = None,
    resumed: Resumed = nothing_resumed,
) -> Progress:
    """The renderer a command should use: quiet, JSON lines (to ``json_stream``), bars on a terminal, else lines;
    with ``progress_file`` (``--progress-fd``) bootc's progress format there too."""
    shown: Progress
    if quiet:
        shown = QuietProgress()
    elif json_events:
        shown = JsonProgress(json_stream or stream, resumed=resumed)
    elif stream.isatty():
        shown = TerminalProgress(stream, resumed=resumed)
    else:
        shown = PlainProgress(stream, resumed=resumed)
    if progress_file is None:
        return shown
    return Several(shown, BootcProgress(progress_file, resumed=resumed))


__all__ = [
    "BootcProgress",
    "JsonProgress",
    "PlainProgress",
    "Progress",
    "QuietProgress",
    "Several",
    "TerminalProgress",
    "open_progress_fd",
    "partials_in",
    "progress_for",
]
