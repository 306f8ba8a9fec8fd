"""What ``image-proxy copy`` shows while it works: bars on a terminal (a real pseudo terminal), plain lines when
stderr is not a terminal, JSON events with --json; and the pull helper's stall and retry events, caused by the
fault proxy between our proxy and the real registry."""

from __future__ import annotations

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
from tests.cli.helpers import COMMAND_TIMEOUT, INSECURE, image_proxy
from tests.faults.proxy import Reset, Stall, fault_proxy

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


def test_bars_on_a_terminal(registry_images, tmp_path):
    big = registry_images.images.big
    status, output = run_on_a_terminal("copy", INSECURE, registry_images.ref("test/big"), f"oci:{tmp_path / 'o'}")
    assert status == 0, output
    assert "\x1b[2K" in output  # lines are erased and redrawn in place
    assert re.search(r"\[#*-*\]", output) and re.search(r"total +\[", output)
    plain = ANSI.sub("", output)
    assert f"Pulling {registry_images.ref('test/big')}: manifest {big.manifest_digest}, 1 layer, 2.1 MB" in plain
    assert re.search(r"layer 1/1 sha256:[0-9a-f]{12}: 2\.1 MB in [0-9.]+ s \([0-9.]+ [kMG]?B/s\), verified", plain)
    assert "Pulled 2.1 MB in" in plain and f"manifest {big.manifest_digest}" in plain.splitlines()[-1]


def test_plain_lines_when_not_a_terminal(registry_images, tmp_path):
    single = registry_images.images.single
    result = image_proxy("copy", INSECURE, registry_images.ref("test/single"), f"oci:{tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"Pulling {registry_images.ref('test/single')}: manifest {single.manifest_digest}")
    assert sum("verified" in line for line in lines) == len(single.layers) + 1  # the layers and the config
    assert lines[-1].startswith("Pulled ")
    assert result.stdout.startswith(f"Copied {registry_images.ref('test/single')} to oci:{tmp_path / 'o'}")


def test_json_events(registry_images, tmp_path):
    single = registry_images.images.single
    result = image_proxy("copy", "--json", INSECURE, registry_images.ref("test/single"), f"dir:{tmp_path / 'd'}")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "pull-started" and kinds[-2:] == ["pull-finished", "copied"]
    assert events[0]["manifestDigest"] == single.manifest_digest
    assert events[0]["totalBytes"] == single.config_size + sum(layer.size for layer in single.layers)
    finished = {e["digest"]: e for e in events if e["event"] == "blob-finished"}
    assert set(finished) == {single.config_digest, *(layer.digest for layer in single.layers)}
    for digest in finished:
        done = [e["done"] for e in events if e["event"] == "blob-progress" and e["digest"] == digest]
        assert done == sorted(done) and done[-1] == finished[digest]["size"]
    assert events[-1]["destination"] == f"dir:{tmp_path / 'd'}"
    assert events[-1]["fetchedBytes"] == events[0]["totalBytes"]
    quiet = image_proxy("copy", "--quiet", INSECURE, registry_images.ref("test/single"), f"dir:{tmp_path / 'd'}")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


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
