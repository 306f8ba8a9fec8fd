"""Run ``image-proxy`` (as ``python -m proxy``) and skopeo the way a person does."""

from __future__ import annotations

import json
import subprocess
import sys

import attrs

#: a hang guard for one command (they take about a second)
COMMAND_TIMEOUT = 120
INSECURE = "--tls-verify=false"


@attrs.frozen
class Result:
    returncode: int
    stdout: str
    stderr: str


def image_proxy(*args: str, timeout: float = COMMAND_TIMEOUT) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def skopeo_run(skopeo: str, *args: str) -> str:
    done = subprocess.run([skopeo, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert done.returncode == 0, f"skopeo {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def skopeo_json(skopeo: str, *args: str) -> dict:
    return json.loads(skopeo_run(skopeo, *args))
