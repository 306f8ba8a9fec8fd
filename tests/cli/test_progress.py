"""What ``image-proxy copy`` shows while it works: bars on a terminal (a real pseudo terminal), aligned; plain lines
when stderr is not a terminal, a start line per blob as it starts; JSON events with --json; and the pull helper's
stall and retry events, caused by the fault proxy between our proxy and the real registry. bootc's --progress-fd
format and resumed bytes: tests/cli/test_progress_fd.py."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import time

import trio

from protocol.client import ImageProxy
from protocol.client.pull import BlobFinished, BlobFlowing, BlobRetrying, BlobStalled, PullFinished, PullStarted, pull
from proxy.commands.progress import TerminalProgress
from tests.cli.helpers import COMMAND_TIMEOUT, INSECURE, image_proxy
from tests.faults.proxy import Drip, Reset, Stall, fault_proxy

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run image-proxy with stdout and stderr on a pseudo terminal; returns its exit status and everything it
    wrote there."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower
    )
    os.close(follower)
    output = bytearray()
    deadline = time.monotonic() + COMMAND_TIMEOUT
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed (the command exited)
                break
            if not chunk:
                break
            output += chunk
        return process.wait(timeout=max(1.0, deadline - time.monotonic())), output.decode(errors="replace")
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_bars_on_a_terminal(registry_images, tmp_path):
    """The layer's body pauses 0.6 s at 1 MB (three bytes dripped 0.2 s apart by the fault proxy), so its bar is on
    the terminal for more than one redraw however fast loopback is."""
    big = registry_images.images.big
    async with fault_proxy(registry_images.registry.port) as fault:
        fault.add_rule(Drip(at=1_000_000, count=3, interval=0.2), path=r"/blobs/" + big.layers[0].digest)
        ref = f"docker://127.0.0.1:{fault.port}/test/big:latest"
        argv = ("copy", INSECURE, ref, f"oci:{tmp_path / 'o'}")
        status, output = await trio.to_thread.run_sync(run_on_a_terminal, *argv)
    assert status == 0, output
    assert "\x1b[?25l" in output and output.rindex("\x1b[?25h") > output.rindex("\x1b[?25l")  # cursor given back
    plain = ANSI.sub("", output)
    assert re.search(r"layer 1/1 sha256:[0-9a-f]{12} +[━╸╺]+ +[0-9.]+/2\.0 MiB", plain), output  # a bar, in MiB
    assert re.search(r"total +[━╸╺]+ +[0-9.]+/2\.0 MiB", plain)
    assert f"Pulling {ref}: manifest {big.manifest_digest}, 1 layer, 2.0 MiB" in plain
    assert re.search(r"layer 1/1 sha256:[0-9a-f]{12}: 2\.0 MiB in [0-9.]+ s \([0-9.]+ [KMG]?i?B/s\), verified", plain)
    assert "Pulled 2.0 MiB in" in plain and f"manifest {big.manifest_digest}" in plain.splitlines()[-1]
    assert "Copying blob" not in plain  # the bars show what started


async def test_the_bars_line_up(registry_images):
    """Labels (config, layer N/M, total) and amounts of different widths: every bar starts and ends in the same
    columns, at each step of a real pull (its events replayed with a clock that moves 0.3 s an event)."""
    events: list = []
    async with ImageProxy.spawn(extra_args=["--insecure-policy", INSECURE]) as proxy:
        await pull(proxy, registry_images.ref("test/single"), Sink(), on_event=events.append)
    clock = iter(range(10_000))
    bars = TerminalProgress(io.StringIO(), now=lambda: next(clock) * 0.3, width=120)
    frames = []
    for event in events:
        bars(event)
        frames.append(bars.live_text())
    bars.close()
    assert max(len(frame) for frame in frames) >= 3  # several bars at once, and the total
    for frame in frames:
        spans = {(m.start(), m.end()) for m in (re.search(r"[━╸╺]+", line) for line in frame) if m is not None}
        assert len(spans) == 1 and len(frame) >= 1, frame
        assert frame[-1].lstrip().startswith("total")
    assert any(re.search(r"[0-9.]+ [KM]?i?B/s +[0-9]/4 blobs", frame[-1]) for frame in frames)


def test_plain_lines_when_not_a_terminal(registry_images, tmp_path):
    single = registry_images.images.single
    result = image_proxy("copy", INSECURE, registry_images.ref("test/single"), f"oci:{tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"Pulling {registry_images.ref('test/single')}: manifest {single.manifest_digest}")
    assert sum("verified" in line for line in lines) == len(single.layers) + 1  # the layers and the config
    # skopeo's start line for each blob, before the line of that blob's end
    for layer in single.layers:
        started = lines.index(f"Copying blob {layer.digest}")
        assert started < next(i for i, line in enumerate(lines) if layer.digest[:19] in line and "verified" in line)
    assert f"Copying config {single.config_digest}" in lines
    assert lines[-1].startswith("Pulled ") and "MiB" in lines[0] + lines[-1]
    assert result.stdout.startswith(f"Copied {registry_images.ref('test/single')} to oci:{tmp_path / 'o'}")
    again = image_proxy("copy", INSECURE, registry_images.ref("test/single"), f"oci:{tmp_path / 'o'}")
    skipped = f"Copying blob {single.layers[0].digest} skipped: already present"
    assert any(line.startswith(skipped) for line in again.stderr.splitlines()), again.stderr


async def test_a_blob_start_is_printed_when_it_starts(registry_images, tmp_path):
    """The big layer's body stops at 300 kB for good (the fault proxy holds every request for it there): its
    ``Copying blob`` line comes while the copy is still waiting for the rest, not when the blob ends."""
    layer = registry_images.images.big.layers[0]
    async with fault_proxy(registry_images.registry.port) as fault:
        fault.add_rule(Stall(at=300_000), path=r"/blobs/" + layer.digest)
        ref = f"docker://127.0.0.1:{fault.port}/test/big:latest"
        argv = [sys.executable, "-m", "proxy", "copy", INSECURE, ref, f"oci:{tmp_path / 'o'}"]
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            seen = b""
            with trio.fail_after(60):
                while f"Copying blob {layer.digest}\n".encode() not in seen:
                    chunk = await process.stderr.receive_some(65536)
                    assert chunk, seen.decode()
                    seen += chunk
            assert process.poll() is None  # the blob cannot have ended: its bytes stop at 300 kB
            assert b"verified" not in seen.split(layer.digest.encode())[-1]
        finally:
            process.kill()
            await process.wait()


def test_json_events(registry_images, tmp_path):
    """snake_case keys, as cache --json's; the end is ``copied`` or ``copy-failed``."""
    single = registry_images.images.single
    result = image_proxy("copy", "--json", INSECURE, registry_images.ref("test/single"), f"dir:{tmp_path / 'd'}")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "pull-started" and kinds[-2:] == ["pull-finished", "copied"]
    assert events[0]["manifest_digest"] == single.manifest_digest
    assert events[0]["total_bytes"] == single.config_size + sum(layer.size for layer in single.layers)
    assert {b["media_type"] for b in events[0]["blobs"]} >= {single.config_media_type}
    finished = {e["digest"]: e for e in events if e["event"] == "blob-finished"}
    assert set(finished) == {single.config_digest, *(layer.digest for layer in single.layers)}
    for digest in finished:
        done = [e["done"] for e in events if e["event"] == "blob-progress" and e["digest"] == digest]
        assert done == sorted(done) and done[-1] == finished[digest]["size"]
        assert finished[digest]["resumed_bytes"] == 0
    assert events[-1]["destination"] == f"dir:{tmp_path / 'd'}"
    assert events[-1]["fetched_bytes"] == events[0]["total_bytes"] and events[-2]["resumed_bytes"] == 0
    assert events[-1]["manifest_digest"] == events[-1]["stored_manifest_digest"] == single.manifest_digest
    keys = {key for event in events for key in event} | {key for b in events[0]["blobs"] for key in b}
    assert keys and all(re.fullmatch(r"[a-z]+(_[a-z]+)*", key) for key in keys), keys
    quiet = image_proxy("copy", "--quiet", INSECURE, registry_images.ref("test/single"), f"dir:{tmp_path / 'd'}")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


def test_json_copy_failed(registry_images, tmp_path):
    ref = registry_images.ref("test/single", "no-such-tag")
    result = image_proxy("copy", "--json", INSECURE, ref, f"oci:{tmp_path / 'o'}")
    assert result.returncode == 1
    (event,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["event"] == "copy-failed" and event["reference"] == ref and "no-such-tag" in event["error"]
    (tmp_path / "file").write_text("not a directory")
    blocked = image_proxy("copy", "--json", INSECURE, registry_images.ref("test/single"), f"oci:{tmp_path / 'file'}")
    assert blocked.returncode != 0
    assert json.loads(blocked.stdout.splitlines()[-1])["event"] == "copy-failed"


def test_no_rich_without_a_terminal(registry_images, tmp_path):
    """rich is imported only to draw on a terminal: not for plain lines, not for JSON."""
    copy_args = (registry_images.ref("test/single"), f"oci:{tmp_path / 'o'}")
    for flags in ((), ("--json",)):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "proxy", "copy", *flags, INSECURE, *copy_args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import ")}
        assert "protocol.client.pull" in modules and not any(m == "rich" or m.startswith("rich.") for m in modules)


class Sink:
    def __init__(self) -> None:
        self.committed: dict[str, bytes] = {}

    def __call__(self, blob):
        parts: list[bytes] = []
        committed = self.committed

        class Writer:
            def write(self, chunk: bytes) -> None:
                parts.append(chunk)

            def commit(self) -> None:
                committed[blob.digest] = b"".join(parts)

            def discard(self) -> None:
                parts.clear()

        return Writer()


async def test_a_stall_the_proxy_resumes_is_reported_while_it_lasts(registry_images):
    """The registry stalls the big layer once; our proxy resumes after its 1 s stall deadline. The pull reports
    the gap as it starts (after 0.3 s without a byte) and when bytes flow again; the blob is still verified."""
    big = registry_images.images.big
    layer = big.layers[0]
    events = []
    sink = Sink()
    async with fault_proxy(registry_images.registry.port) as fault:
        fault.add_rule(Stall(at=300_000), path=r"/blobs/" + layer.digest, nth=1)
        ref = f"docker://127.0.0.1:{fault.port}/test/big:latest"
        async with ImageProxy.spawn(extra_args=[INSECURE, "--stall-timeout", "1"]) as proxy:
            with trio.fail_after(30):
                image = await pull(proxy, ref, sink, on_event=events.append, stall_notice=0.3)
    assert image.manifest_digest == big.manifest_digest and sink.committed[layer.digest] == big.blob(layer.digest)
    about_layer = [e for e in events if getattr(e, "blob", None) is not None and e.blob.digest == layer.digest]
    kinds = [type(e) for e in about_layer if type(e) in (BlobStalled, BlobFlowing, BlobFinished)]
    assert kinds == [BlobStalled, BlobFlowing, BlobFinished]
    stalled, flowing = (e for e in about_layer if type(e) in (BlobStalled, BlobFlowing))
    assert stalled.done == flowing.done <= 300_000 and 0.3 <= stalled.seconds < 1.0 and flowing.seconds >= 0.5
    assert isinstance(events[0], PullStarted) and isinstance(events[-1], PullFinished)


async def test_a_blob_the_proxy_gives_up_on_is_fetched_again(registry_images):
    """With --max-resumes 0 our proxy gives up on the first reset (a retryable error); the pull fetches the blob
    again from the start and says so."""
    big = registry_images.images.big
    layer = big.layers[0]
    events = []
    sink = Sink()
    async with fault_proxy(registry_images.registry.port) as fault:
        fault.add_rule(Reset(at=100_000), path=r"/blobs/" + layer.digest, nth=1)
        ref = f"docker://127.0.0.1:{fault.port}/test/big:latest"
        async with ImageProxy.spawn(extra_args=[INSECURE, "--max-resumes", "0"]) as proxy:
            with trio.fail_after(30):
                await pull(proxy, ref, sink, on_event=events.append)
    (retry,) = [e for e in events if isinstance(e, BlobRetrying)]
    assert retry.blob.digest == layer.digest and retry.attempt == 1 and retry.delay == 1.0
    assert sink.committed[layer.digest] == big.blob(layer.digest)
