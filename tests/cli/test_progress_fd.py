"""``image-proxy copy --progress-fd N``: bootc's JSON-lines progress (``Start``, ``ProgressBytes``,
``ProgressSteps``, the fields and camelCase names of bootc's crates/lib/src/progress_jsonl.rs), read back from a pipe
as a tool driving bootc reads it; and blobs resumed from the blob cache, shown as resumed rather than fetched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from proxy.cache.files import SOURCE_XATTR, source_tag
from proxy.commands.units import format_size
from tests.cli.helpers import COMMAND_TIMEOUT, INSECURE, image_proxy
from tests.faults.proxy import fault_proxy

#: the fields bootc's schema (progress-v0) requires of each event type, and of the subtasks each carries
REQUIRED = {
    "Start": {"type", "version"},
    "ProgressBytes": {
        "type",
        "task",
        "description",
        "id",
        "bytesCached",
        "bytes",
        "bytesTotal",
        "stepsCached",
        "steps",
        "stepsTotal",
        "subtasks",
    },
    "ProgressSteps": {"type", "task", "description", "id", "stepsCached", "steps", "stepsTotal", "subtasks"},
}
SUBTASK_BYTES = {"subtask", "description", "id", "bytesCached", "bytes", "bytesTotal"}
SUBTASK_STEP = {"subtask", "description", "id", "completed"}
COUNTS = ("bytesCached", "bytes", "bytesTotal", "stepsCached", "steps", "stepsTotal")


def copy_with_progress_fd(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``image-proxy copy --progress-fd N ARGS`` with N the write end of a pipe; the lines read from it."""
    read_end, fd = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "copy", "--progress-fd", str(fd), *args],
            pass_fds=[fd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(fd)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()  # to EOF: the copy ended (its end of the pipe closed)
    stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done, data.decode().splitlines()


def check_shape(lines: list[str]) -> list[dict]:
    """Each line one canonical JSON object (sorted keys, no spaces), of bootc's types with their required fields."""
    events = [json.loads(line) for line in lines]
    for line, event in zip(lines, events, strict=True):
        assert line == json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert set(event) == REQUIRED[event["type"]], event
        for key in COUNTS:
            if key in event:
                assert isinstance(event[key], int) and event[key] >= 0, event
        for subtask in event.get("subtasks", ()):
            assert set(subtask) == (SUBTASK_BYTES if event["type"] == "ProgressBytes" else SUBTASK_STEP)
    assert events[0] == {"type": "Start", "version": "0.1.0"}
    assert all(e["type"] != "Start" for e in events[1:])
    return events


def test_a_copy_reports_bootc_progress(registry_images, tmp_path):
    single = registry_images.images.single
    ref = registry_images.ref("test/single")
    done, lines = copy_with_progress_fd(INSECURE, ref, f"oci:{tmp_path / 'o'}")
    assert done.returncode == 0, done.stderr
    assert "Copying blob" in done.stderr  # the person's progress goes on as without --progress-fd
    events = check_shape(lines)
    pulling = [e for e in events if e["type"] == "ProgressBytes"]
    assert pulling and all(e["task"] == "pulling" and e["id"] == single.manifest_digest for e in pulling)
    total = single.config_size + sum(layer.size for layer in single.layers)
    assert pulling[0]["bytes"] == 0 and pulling[0]["bytesTotal"] == total
    assert [e["bytes"] for e in pulling] == sorted(e["bytes"] for e in pulling)
    last = pulling[-1]
    assert (last["bytes"], last["bytesTotal"], last["bytesCached"]) == (total, total, 0)
    assert (last["steps"], last["stepsTotal"], last["stepsCached"]) == (3, 3, 0)  # steps are layers
    sizes = {single.config_digest: single.config_size, **{layer.digest: layer.size for layer in single.layers}}
    assert {s["id"]: (s["bytes"], s["bytesTotal"]) for s in last["subtasks"]} == {d: (n, n) for d, n in sizes.items()}
    assert {s["subtask"] for s in last["subtasks"]} == {"config", "layer"}
    writing = [e for e in events if e["type"] == "ProgressSteps"]
    assert [(e["task"], e["steps"], e["stepsTotal"], e["subtasks"][0]["completed"]) for e in writing] == [
        ("writing", 0, 1, False),
        ("writing", 1, 1, True),
    ]
    assert events[-1] == writing[-1]

    # the same image again: everything is in the destination already, cached in bootc's terms
    again, lines = copy_with_progress_fd("--quiet", INSECURE, ref, f"oci:{tmp_path / 'o'}")
    assert again.returncode == 0 and again.stderr == ""
    last = [e for e in check_shape(lines) if e["type"] == "ProgressBytes"][-1]
    assert (last["bytes"], last["bytesTotal"], last["bytesCached"]) == (0, 0, total)
    assert (last["steps"], last["stepsTotal"], last["stepsCached"]) == (0, 0, 3)


def test_a_reader_that_goes_away_stops_the_writing_not_the_copy(registry_images, tmp_path):
    copy_args = (registry_images.ref("test/single"), f"oci:{tmp_path / 'o'}")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "copy", "--progress-fd", str(write_end), "--quiet", INSECURE, *copy_args],
            pass_fds=[write_end],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "image-proxy copy: --progress-fd: Broken pipe; no more progress is written there"
    ]
    assert (tmp_path / "o" / "index.json").exists()


def test_a_progress_fd_that_is_not_open_is_a_usage_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "copy", "--progress-fd", "63", "oci:x:y", f"oci:{tmp_path / 'o'}"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2 and done.stderr == "image-proxy copy: --progress-fd 63: Bad file descriptor\n"


def leave_partial(cache: Path, digest: str, data: bytes, source: str) -> None:
    """What an interrupted copy with --blob-cache from ``source`` (the repository, ``host:port/name``) leaves: the
    blob's first bytes in blobs/<algo>/<hex>.partial, tagged with their source."""
    algorithm, hexpart = digest.split(":", 1)
    directory = cache / "blobs" / algorithm
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = directory / f"{hexpart}.partial"
    partial.write_bytes(data)
    partial.chmod(0o600)
    os.setxattr(partial, SOURCE_XATTR, source_tag(source))


async def test_resumed_bytes_are_shown_as_resumed(registry_images, tmp_path):
    """1 MiB of the 2 MiB layer is in the blob cache from an earlier run: the proxy asks the registry for the rest
    only (a Range request from there), and every output says 1 MiB resumed, 1 MiB fetched: the JSON events, the
    plain lines, and bootc's bytesCached."""
    big = registry_images.images.big
    layer = big.layers[0]
    blob = big.blob(layer.digest)
    resumed = 1 << 20
    cache = tmp_path / "cache"
    async with fault_proxy(registry_images.registry.port) as fault:  # no faults: it records the requests
        ref = f"docker://127.0.0.1:{fault.port}/test/big:latest"
        flags = (INSECURE, "--blob-cache", str(cache), ref)

        leave_partial(cache, layer.digest, blob[:resumed], f"127.0.0.1:{fault.port}/test/big")
        done = await trio.to_thread.run_sync(lambda: image_proxy("copy", "--json", *flags, f"oci:{tmp_path / 'o'}"))
        assert done.returncode == 0, done.stderr
        assert ranges_asked(fault, layer.digest) == [f"bytes={resumed}-"]  # the proxy really resumed there

        (cache / "blobs" / "sha256" / layer.digest.split(":")[1]).unlink()  # as if that run had been ended too
        leave_partial(cache, layer.digest, blob[:resumed], f"127.0.0.1:{fault.port}/test/big")
        again, lines = await trio.to_thread.run_sync(lambda: copy_with_progress_fd(*flags, f"oci:{tmp_path / 'p'}"))
        assert again.returncode == 0, again.stderr
        assert ranges_asked(fault, layer.digest) == [f"bytes={resumed}-"] * 2

    events = [json.loads(line) for line in done.stdout.splitlines()]
    (started,) = [e for e in events if e["event"] == "blob-started" and e["digest"] == layer.digest]
    (finished,) = [e for e in events if e["event"] == "blob-finished" and e["digest"] == layer.digest]
    (pulled,) = [e for e in events if e["event"] == "pull-finished"]
    assert started["resumed_bytes"] == finished["resumed_bytes"] == pulled["resumed_bytes"] == resumed
    for destination in ("o", "p"):
        assert (tmp_path / destination / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes() == blob

    plain = again.stderr.splitlines()
    assert f"Copying blob {layer.digest} (resuming: 1.0 MiB of 2.0 MiB in the blob cache)" in plain
    assert any(line.endswith("verified; 1.0 MiB of it resumed from the blob cache") for line in plain), plain
    pulled_line = next(line for line in plain if line.startswith("Pulled "))
    fetched = big.config_size + layer.size - resumed
    assert pulled_line.startswith(f"Pulled {format_size(fetched)} in ")
    assert pulled_line.endswith("; 1.0 MiB more resumed from the blob cache")

    last = [e for e in check_shape(lines) if e["type"] == "ProgressBytes"][-1]
    assert (last["bytesCached"], last["bytes"], last["bytesTotal"]) == (resumed, fetched, fetched)
    (subtask,) = [s for s in last["subtasks"] if s["id"] == layer.digest]
    assert (subtask["bytesCached"], subtask["bytes"], subtask["bytesTotal"]) == (resumed, layer.size, layer.size)


def ranges_asked(fault, digest: str) -> list[str]:
    """The Range headers of the requests for a blob that reached the registry through the fault proxy."""
    return [
        value
        for record in fault.requests
        if record.target.endswith(digest)
        for name, value in record.headers
        if name == "range"
    ]
