"""The commands with --proxy-socket (issue 18): a relative local path is the command's, not the daemon's (the
client makes it absolute), and a hint never suggests a flag that this mode refuses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]


async def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True, timeout=120
        )
    )


async def test_a_relative_oci_path_is_resolved_where_the_command_runs(start_daemon, tmp_path):
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "examples" / "hello", work / "hello")
    result = await run(work, "inspect", "--proxy-socket", str(daemon.socket_path), "oci:hello:latest")
    assert result.returncode == 0, result.stderr
    assert "Digest:      sha256:" in result.stdout
    # the daemon runs elsewhere: the same words sent as they are would name its own ./hello, which does not exist
    assert not (Path.cwd() / "hello").exists()


async def test_a_tls_failure_through_the_daemon_hints_at_the_daemons_settings(start_daemon, registry_images, tmp_path):
    # a daemon that verifies TLS, and a plain-HTTP registry: the server's text mentions --tls-verify=false, which
    # this command refuses with --proxy-socket; the hint says where the setting is
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--tls-verify=true")
    result = await run(
        tmp_path, "inspect", "--proxy-socket", str(daemon.socket_path), registry_images.ref("test/single")
    )
    assert result.returncode == 1
    assert "hint: with --proxy-socket the daemon's settings decide" in result.stderr, result.stderr
    assert "insecure=true" in result.stderr
