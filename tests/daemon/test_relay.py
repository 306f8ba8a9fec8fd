"""Update agents get the daemon without changing a line (issue 22, part 2): ``[spawned] daemon = SOCKET`` makes the
``image-proxy experimental-image-proxy`` an agent spawns (socket on stdin, stdout to /dev/null, as
containers-image-proxy-rs does) relay the agent's packets to the daemon and the daemon's replies, fds included.
The registry is the real one behind the fault proxy, which counts what it serves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from protocol.client import ImageProxy
from protocol.client.pull import pull
from tests.faults.conftest import FaultImages, Layer
from tests.faults.proxy import FaultProxy, Stall
from tests.support.sinks import discard_all

AGENT = [sys.executable, "-m", "proxy", "experimental-image-proxy"]
PULL_GUARD = 60.0


def relay_config(tmp_path: Path, daemon_socket: Path | str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[spawned]\ndaemon = "{daemon_socket}"\n')
    return config


#: the child's side of Agent(auth=...): argv[1] onto fd 100, then exec the rest
_ON_FD_100 = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 100); os.close(fd); os.execv(sys.argv[2], sys.argv[2:])"
)


class Agent:
    """``image-proxy experimental-image-proxy`` spawned the way an update agent does, driven by the bindings.
    ``auth``: an auth file's content, handed over as rpm-ostree and bootc do (containers-image-proxy-rs
    ``auth_data``): a memfd on the child's fd 100, and ``--authfile /proc/self/fd/100``."""

    def __init__(self, *flags: str, auth: bytes | None = None, env: dict[str, str] | None = None) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv, passed = [*AGENT, *flags], ()
        if auth is not None:
            memfd = os.memfd_create("auth.json", 0)
            os.write(memfd, auth)
            os.lseek(memfd, 0, os.SEEK_SET)
            # moved to fd 100 in the child, which then execs the proxy (same pid): the Rust client's take_fd_n
            argv = [sys.executable, "-c", _ON_FD_100, str(memfd), *argv, "--authfile", "/proc/self/fd/100"]
            passed = (memfd,)
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=theirs,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=passed,
                env={**os.environ, **(env or {})},
            )
        finally:
            theirs.close()
            for fd in passed:
                os.close(fd)

    async def pull(self, reference: str) -> None:
        with trio.fail_after(PULL_GUARD):
            async with ImageProxy.connect(self.sock) as proxy:
                await pull(proxy, reference, discard_all, retries=0)

    async def pull_and_exit(self, reference: str) -> str:
        """Pull ``reference``, close the connection (the agent's proxy exits), and return its stderr."""
        await self.pull(reference)
        self.sock.close()
        return await self.stderr()

    async def stderr(self) -> str:
        """Its stderr, once it has exited (which it must within 10 s)."""
        _, err = await trio.to_thread.run_sync(self.process.communicate, None, 10)
        return err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stderr.close()


def blob_gets(fault: FaultProxy, images: FaultImages) -> int:
    return sum(len(fault.requests_for(f"/blobs/{layer.digest}")) for layer in (images.seed, images.long, images.small))


async def test_two_agents_share_the_daemons_downloads(start_daemon, fault, fault_images, tmp_path):
    daemon = await start_daemon("--insecure-policy", "--blob-cache", str(tmp_path / "cache"))
    config = relay_config(tmp_path, daemon.socket_path)
    agents = [Agent("--config", str(config)) for _ in range(2)]
    try:
        async with trio.open_nursery() as nursery:
            for agent in agents:
                nursery.start_soon(agent.pull, fault_images.ref(fault.port))
        for agent in agents:
            assert "serving this client here" not in await agent.stderr()
    finally:
        for agent in agents:
            agent.kill()
    assert blob_gets(fault, fault_images) == 3, "each blob once from the registry, for both agents"
    for agent in agents:  # the daemon served them: it saw each relay connect, with the agent's uid
        await daemon.wait_for_log(rf"connection from pid {agent.process.pid} uid {os.getuid()}\b")


async def test_an_agent_killed_mid_pull_gets_the_rest_from_the_daemons_partial(
    start_daemon, fault, fault_images, tmp_path
):
    cache = tmp_path / "cache"
    daemon = await start_daemon("--insecure-policy", "--blob-cache", str(cache))
    config = relay_config(tmp_path, daemon.socket_path)
    resumed = await killed_mid_pull_then_pulled_again(
        fault, fault_images.ref(fault.port), fault_images.long, cache, config
    )
    assert resumed and all(r is not None and not r.startswith("bytes=0-") for r in resumed), resumed


async def killed_mid_pull_then_pulled_again(
    fault: FaultProxy, reference: str, layer: Layer, cache: Path, config: Path, **agent_options: Any
) -> list[str | None]:
    """An agent pulling ``reference`` is killed (SIGKILL, its relay with it) once ``layer``'s body stalled at half
    with a partial in the daemon's ``cache``; another agent then pulls it. The Range headers of the layer's later
    requests that the registry answered."""
    stall = fault.add_rule(Stall(at=layer.size // 2), path=f"/blobs/{layer.digest}")
    first = Agent("--config", str(config), **agent_options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.pull, reference)
            await fault.wait_until(lambda: bool(stall.fired), timeout=PULL_GUARD)
            partial = cache / "blobs" / "sha256" / (layer.digest.split(":", 1)[1] + ".partial")
            await fault.wait_until(lambda: partial.exists() and partial.stat().st_size > 0, timeout=PULL_GUARD)
            first.process.send_signal(signal.SIGKILL)
            nursery.cancel_scope.cancel()
    finally:
        first.kill()
    fault.remove_rule(stall)
    second = Agent("--config", str(config), **agent_options)
    try:
        await second.pull(reference)
    finally:
        second.kill()
    return [r.range for r in fault.requests_for(f"/blobs/{layer.digest}") if r.status in (200, 206)][1:]


async def test_without_a_daemon_the_agent_serves_itself_and_says_so_once(tmp_path):
    config = relay_config(tmp_path, tmp_path / "no-daemon.sock")
    agent = Agent("--config", str(config))  # nothing of its own: it would relay, but nothing listens there
    try:
        agent.sock.settimeout(30)
        assert _request(agent.sock, "Initialize")["value"] == "0.2.8"  # answered by the agent's own proxy
        assert "request-ids" in _request(agent.sock, "GetCapabilities")["value"]
        agent.sock.close()
        err = await agent.stderr()
    finally:
        agent.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert f"daemon at {tmp_path / 'no-daemon.sock'}: No such file or directory; serving this client here" in lines[0]


async def test_flags_the_daemon_would_not_apply_make_the_agent_serve_itself(
    start_daemon, fault, fault_images, tmp_path
):
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache")
    config = relay_config(tmp_path, daemon.socket_path)
    agent = Agent("--config", str(config), "--insecure-policy", "--tls-verify=false")
    try:
        err = await agent.pull_and_exit(fault_images.ref(fault.port))
    finally:
        agent.kill()
    lines = [line for line in err.splitlines() if "not through the daemon" in line]
    assert len(lines) == 1 and "--tls-verify, --insecure-policy would not apply there" in lines[0], err
    assert not [line for line in daemon.log if f"pid {agent.process.pid} " in line]


def _request(sock: socket.socket, method: str) -> dict:
    sock.send(json.dumps({"method": method, "args": []}).encode())
    return json.loads(sock.recv(1 << 16))


async def test_the_relay_ends_within_a_second_of_eof_or_shutdown(start_daemon, tmp_path):
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache")
    config = relay_config(tmp_path, daemon.socket_path)
    for ending in ("eof", "shutdown"):
        agent = Agent("--config", str(config))
        try:
            agent.sock.settimeout(30)
            assert _request(agent.sock, "Initialize")["value"] == "0.2.8"
            await daemon.wait_for_log(rf"connection from pid {agent.process.pid} ")
            if ending == "eof":
                agent.sock.close()
            else:
                agent.sock.send(json.dumps({"method": "Shutdown", "args": []}).encode())
            started = time.monotonic()
            status = await trio.to_thread.run_sync(agent.process.wait, 10)
            assert status == 0 and time.monotonic() - started < 1.0, (ending, status)
        finally:
            agent.sock.close()
            agent.kill()


#: what a relay never imports: it passes packets on (tests/cli/test_startup_imports.py does the same for a spawned
#: proxy that serves itself)
NOT_IN_A_RELAY = ("trio", "attrs", "proxy.server.session", "proxy.config.daemon_conf", "protocol.codec", "pathlib")


async def test_a_relay_imports_nothing_it_does_not_use(start_daemon, tmp_path):
    """Its start-up is what an agent waits for before Initialize: the interpreter, argparse, logging and the
    relay, not trio, attrs, the session or the settings machinery (spawn to Initialize: ~40 ms against ~150)."""
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache")
    config = relay_config(tmp_path, daemon.socket_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "proxy", "experimental-image-proxy", "--config", str(config)],
        stdin=theirs,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        ours.settimeout(30)
        assert _request(ours, "Initialize")["value"] == "0.2.8"
        await daemon.wait_for_log(rf"connection from pid {process.pid} ")  # answered by the daemon
        ours.close()
        _, stderr = await trio.to_thread.run_sync(process.communicate, None, 30)
    finally:
        ours.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    modules = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert "proxy.server.relay" in modules, "the importtime output was read"
    assert sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_IN_A_RELAY)) == []


async def test_a_daemon_that_refuses_the_relay_leaves_the_agent_to_serve_itself(start_daemon, tmp_path):
    """A daemon at its connection limit answers a new client's first request with the reason: the relay asks it
    first (GetCapabilities), and serves the agent itself, saying why in one line."""
    settings = tmp_path / "daemon.toml"
    settings.write_text("[daemon]\nmax-connections = 1\n")
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--config", str(settings))
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    holder.settimeout(30)
    holder.connect(str(daemon.socket_path))
    assert _request(holder, "Initialize")["value"] == "0.2.8"  # the one connection the daemon takes
    agent = Agent("--config", str(relay_config(tmp_path, daemon.socket_path)))
    try:
        agent.sock.settimeout(30)
        assert _request(agent.sock, "Initialize")["value"] == "0.2.8"  # answered all the same: by the agent
        agent.sock.close()
        err = await agent.stderr()
    finally:
        agent.kill()
        holder.close()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "the daemon refused" in lines[0] and "serving this client here" in lines[0], err
