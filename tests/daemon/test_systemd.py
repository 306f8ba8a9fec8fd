"""The systemd side: the units in contrib/systemd/ pass `systemd-analyze verify`, and the daemon runs under the
real `systemd-socket-activate --seqpacket`, sharing one process (Accept=no) or one process per client
(Accept=yes)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "contrib" / "systemd"
HANG_GUARD = 60.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the systemd tests need Debian's systemd package (./setup.sh --test)")
    return path


def install_units(directory: Path, names: list[str]) -> list[Path]:
    """Copy units with ExecStart pointing at this checkout's image-proxy (verify checks that it exists)."""
    executable = Path(sys.executable).with_name("image-proxy")
    assert executable.exists(), f"{executable} is missing: run ./setup.sh"
    directory.mkdir()
    paths = []
    for name in names:
        path = directory / name
        path.write_text((UNITS / name).read_text().replace("/usr/bin/image-proxy", str(executable)))
        paths.append(path)
    return paths


def verify(*units: Path) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        cwd=units[0].parent,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    """Both set-ups, as shipped but for the ExecStart path; a warning counts as a failure."""
    verify(*install_units(tmp_path / "shared", ["image-proxy.socket", "image-proxy.service"]))
    socket_unit, template = install_units(tmp_path / "per-connection", ["image-proxy.socket", "image-proxy@.service"])
    dropin = socket_unit.parent / "image-proxy.socket.d"
    dropin.mkdir()
    shutil.copy(UNITS / "per-connection.conf", dropin / "per-connection.conf")
    instance = template.with_name("image-proxy@0.service")
    shutil.copy(template, instance)
    verify(socket_unit, instance)


def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt setting is reported."""
    (service,) = install_units(tmp_path / "broken", ["image-proxy.service"])
    service.write_text(service.read_text().replace("Type=notify", "Type=notifyy"))
    with pytest.raises(AssertionError, match="Failed to parse service type"):
        verify(service)


def test_the_service_has_the_hardening_the_issue_asks_for():
    service = (UNITS / "image-proxy.service").read_text()
    for line in (
        "Type=notify",
        "CacheDirectory=image-proxy",
        "RuntimeDirectory=image-proxy",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "User=image-proxy",
    ):
        assert f"\n{line}\n" in service, line
    socket_unit = (UNITS / "image-proxy.socket").read_text()
    assert "ListenSequentialPacket=/run/image-proxy/image-proxy.sock" in socket_unit
    assert "SocketMode=0660" in socket_unit and "SocketGroup=image-proxy" in socket_unit
    assert "Accept=yes" in (UNITS / "per-connection.conf").read_text()
    assert "StandardInput=socket" in (UNITS / "image-proxy@.service").read_text()


async def pull(path: Path, image) -> tuple[int, list[str]]:
    """(the server's pid as the kernel saw it, the layer digests read) over one connection."""
    async with ImageProxy.connect(path) as proxy:
        img = await proxy.open_image(image.ref)
        digests = []
        for layer in image.layers:
            data = await proxy.get_blob(img, layer.digest, layer.size)
            digests.append("sha256:" + hashlib.sha256(data).hexdigest())
        return digests


@pytest.mark.parametrize("mode", ["daemon", "per-connection"])
async def test_under_systemd_socket_activate(mode, start_daemon, socket_dir, single):
    path = socket_dir / "activated.sock"
    if mode == "daemon":
        command = [sys.executable, "-m", "proxy", "daemon", "--no-blob-cache"]
        flags = []
    else:
        command = [sys.executable, "-m", "proxy", "experimental-image-proxy"]
        flags = ["--accept", "--inetd"]  # one process per connection, the connection on its stdin
    activator = await start_daemon(
        argv=[tool("systemd-socket-activate"), "--seqpacket", *flags, "-l", str(path), *command], wait=False
    )
    await activator.wait_for_log(f"Listening on {path}")
    with trio.fail_after(HANG_GUARD):
        for _ in range(3):
            assert await pull(path, single) == [layer.digest for layer in single.layers]
    log = "\n".join(activator.log)
    if mode == "daemon":
        await activator.wait_for_log("using the socket passed by the service manager")
        assert log.count("Execing") == 1 and "connection from pid" in log
    else:
        assert log.count("Spawned") == 3
    activator.signal(signal.SIGTERM)
    assert await activator.exit_code(10) in (0, -signal.SIGTERM)
