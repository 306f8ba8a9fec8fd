"""Fixtures for daemon mode: a real ``image-proxy daemon`` process on a socket in a temporary directory, ready
when it says so over ``NOTIFY_SOCKET`` (as systemd would hear it), its log lines readable as they come; the
registry images and fault proxy of tests/faults."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from tests.faults.conftest import fault, fault_images  # noqa: F401  (fixtures used by the daemon tests)

START_GUARD = 30.0


class DaemonProcess:
    """One daemon. ``log`` holds its stderr lines so far; ``wait_for_log`` waits for a line to appear.

    Once its stderr reaches EOF (the daemon exited) ``log`` holds every line it wrote, and ``notifications`` every
    datagram it sent: those were queued on our socket before it exited, and are taken without waiting then."""

    def __init__(self, process: trio.Process, socket_path: Path, notify: socket.socket) -> None:
        self.process = process
        self.socket_path = socket_path
        self.log: list[str] = []
        self.notifications: list[str] = []
        self._notify = notify  # non-blocking: the datagrams already queued are read without waiting
        self._changed = trio.Event()
        #: set when stderr reached EOF and every line is in ``log``
        self.log_ended = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.log.extend(line.decode(errors="replace") for line in lines)
            self._note()
        if buffer:
            self.log.append(buffer.decode(errors="replace"))
        self._take_queued_notifications()
        self.log_ended.set()
        self._note()

    def _take_queued_notifications(self) -> None:
        """Every datagram queued on the notify socket now, without waiting."""
        while True:
            try:
                data = self._notify.recv(4096)
            except BlockingIOError:
                return
            self.notifications.extend(data.decode().split("\n"))

    async def _read_notifications(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._notify)
            self._take_queued_notifications()
            self._note()

    async def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = START_GUARD) -> None:
        """Until ``predicate()`` holds; an AssertionError once the daemon's stderr ended without it (the daemon
        exited: every line and notification it wrote is in by then) or after ``timeout`` seconds."""
        try:
            with trio.fail_after(timeout):
                while not predicate():
                    if self.log_ended.is_set():
                        code = await self.process.wait()
                        raise AssertionError(f"daemon exited ({code}) before {what}; log:\n" + "\n".join(self.log))
                    await self._changed.wait()
        except trio.TooSlowError:
            raise AssertionError(f"no {what} within {timeout}s; log:\n" + "\n".join(self.log)) from None

    async def wait_for_log(self, pattern: str, timeout: float = START_GUARD) -> str:
        regex = re.compile(pattern)
        await self.wait_for(lambda: any(regex.search(line) for line in self.log), f"log line /{pattern}/", timeout)
        return next(line for line in self.log if regex.search(line))

    async def ready(self) -> None:
        await self.wait_for(lambda: "READY=1" in self.notifications, "READY=1")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


StartDaemon = Callable[..., Awaitable[DaemonProcess]]


@pytest.fixture
def socket_dir() -> Path:
    """A directory other users can traverse (pytest's tmp_path is 0700), for the socket."""
    path = Path(tempfile.mkdtemp(prefix="image-proxy-daemon-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
async def start_daemon(socket_dir: Path, tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """``await start_daemon(*flags, argv=None, env=None)`` starts a daemon listening on ``socket_dir/s.sock`` (unless
    ``argv`` replaces the command) and returns once it notified READY=1. Every daemon still running at the end of
    the test is killed."""
    started: list[DaemonProcess] = []
    async with trio.open_nursery() as nursery:

        async def start(
            *flags: str, argv: Sequence[str] | None = None, env: dict[str, str] | None = None, wait: bool = True
        ) -> DaemonProcess:
            notify_path = tmp_path / f"notify-{len(started)}"
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.setblocking(False)
            notify.bind(str(notify_path))
            path = socket_dir / "s.sock"
            command = argv or [
                sys.executable,
                "-m",
                "proxy",
                "daemon",
                "--listen",
                str(path),
                "--tls-verify=false",
                *flags,
            ]
            process = await trio.lowlevel.open_process(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})},
            )
            daemon = DaemonProcess(process, path, notify)
            started.append(daemon)
            nursery.start_soon(daemon._read_log)
            nursery.start_soon(daemon._read_notifications)
            if wait:
                await daemon.ready()
            return daemon

        try:
            yield start
        finally:
            for daemon in started:
                if daemon.process.returncode is None:
                    daemon.process.send_signal(signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await daemon.process.wait()
            nursery.cancel_scope.cancel()
    for daemon in started:
        daemon._notify.close()


# --------------------------------------------------------------------------------------------- issue 13: large blobs

#: the large image's one layer: tens of MiB, so that a pull lasts long enough to share the daemon with a flood
LARGE_LAYER_BYTES = 48 << 20


@pytest.fixture(scope="session")
def large_image(registry_images, tmp_path_factory: pytest.TempPathFactory):
    """``test/large:latest`` in the session's registry: one stored-gzip layer of about 48 MiB (BuiltImage; its
    ``ref`` is the registry's, ``docker://127.0.0.1:PORT/test/large:latest``)."""
    import dataclasses

    from tests.support.images import ImageSpec, LayerSpec, build_oci_layout, pseudo_random, skopeo_copy

    root = tmp_path_factory.mktemp("large-image") / "layout"
    spec = ImageSpec(layers=(LayerSpec({"large.bin": pseudo_random("large", LARGE_LAYER_BYTES)}, "COPY large.bin /"),))
    layout = build_oci_layout(root, {"large": dataclasses.replace(spec, gzip_level=0)})
    image = layout.images["large"]
    ref = registry_images.ref("test/large")
    skopeo_copy(image.ref, ref, "--dest-tls-verify=false")
    return dataclasses.replace(image, ref=ref)
