"""The commands end as a Unix tool does (issue 18): Ctrl-C / SIGTERM during a copy print one line and exit 130 /
143 within a second, leaving no temporary file and no index naming a blob that is not there; a closed stdout ends
a command quietly with 141. The copy runs on a pseudo-terminal (progress bars on) from the real registry through
the fault proxy, which stalls a layer half-way so that the signal arrives mid-transfer."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.faults.conftest import FaultImages, fault, fault_images  # noqa: F401  (fixtures)
from tests.faults.proxy import FaultProxy, Stall

ROOT = Path(__file__).resolve().parents[2]
#: from the signal to the process's exit: the cancellation and clean-up, generously
EXIT_WITHIN = 5.0


def read_all(fd: int) -> bytes:
    """Everything a pty master gives until the other side is closed (EIO)."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_mid_copy_ends_it_with_one_line_and_a_clean_destination(
    fault: FaultProxy,  # noqa: F811
    fault_images: FaultImages,  # noqa: F811
    tmp_path: Path,
    signum: int,
    status: int,
) -> None:
    layer = fault_images.long
    stall = fault.add_rule(Stall(at=layer.size // 2), path=f"/blobs/{layer.digest}")
    destination = tmp_path / "dest"
    master, slave = pty.openpty()
    argv = [sys.executable, "-m", "proxy", "--insecure-policy", "copy", "--tls-verify=false"]
    argv += ["--stall-timeout", "60", fault_images.ref(fault.port), f"oci:{destination}:latest"]
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True)
    os.close(slave)
    try:
        await fault.wait_until(lambda: bool(stall.fired), timeout=60)  # the layer is half-way and stuck now
        process.send_signal(signum)
        signalled = time.monotonic()
        status_got = await trio.to_thread.run_sync(process.wait, 30)
        took = time.monotonic() - signalled
        output = (await trio.to_thread.run_sync(read_all, master)).decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert status_got == status, output
    assert took < EXIT_WITHIN, f"exited {took:.1f} s after the signal"
    assert "Traceback" not in output and "Exception" not in output, output
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)  # the bars' cursor movements
    lines = [line.strip() for line in plain.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "image-proxy copy: interrupted", output
    assert output.count("interrupted") == 1, output
    left = sorted(p.name for p in destination.rglob("*") if p.is_file())
    assert not [name for name in left if "partial" in name], left  # the stalled layer's temporary file is gone
    assert "index.json" not in left  # no image was recorded: nothing names a blob that is not there


def test_a_closed_stdout_ends_a_command_quietly_with_141(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write gets EPIPE
    try:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "proxy", "--insecure-policy", "copy", "--json"),
                *(f"oci:{ROOT / 'examples/hello'}:latest", f"oci:{tmp_path / 'out'}:latest"),
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


async def test_a_copy_interrupted_with_a_blob_cache_is_resumed_by_the_next_one(
    fault: FaultProxy,  # noqa: F811
    fault_images: FaultImages,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Ctrl-C leaves what the cache fetched as a partial; the next copy asks the registry only for the rest."""
    layer = fault_images.long
    half = layer.size // 2
    blob_path = f"/blobs/{layer.digest}"
    stall = fault.add_rule(Stall(at=half), path=blob_path)
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "proxy", "--insecure-policy", "copy", "-q", "--tls-verify=false"]
    argv += ["--blob-cache", str(cache), fault_images.ref(fault.port)]
    first = subprocess.Popen([*argv, f"oci:{tmp_path / 'first'}:latest"], stderr=subprocess.PIPE, cwd=ROOT)
    try:
        await fault.wait_until(lambda: bool(stall.fired), timeout=60)
        partial = cache / "blobs" / "sha256" / (layer.digest.split(":", 1)[1] + ".partial")
        await fault.wait_until(lambda: partial.exists() and partial.stat().st_size >= half, timeout=60)
        first.send_signal(signal.SIGINT)
        assert await trio.to_thread.run_sync(first.wait, 30) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    assert partial.stat().st_size >= half  # kept for the next pull
    fault.remove_rule(stall)
    second = await trio.to_thread.run_sync(
        lambda: subprocess.run([*argv, f"oci:{tmp_path / 'second'}:latest"], capture_output=True, text=True, cwd=ROOT)
    )
    assert second.returncode == 0, second.stderr
    ranges = [r.range for r in fault.requests_for(blob_path)[1:]]
    assert ranges and all(r is not None and int(r.removeprefix("bytes=").split("-")[0]) >= half for r in ranges), ranges
    copied = tmp_path / "second" / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
    assert copied.read_bytes() == layer.data
