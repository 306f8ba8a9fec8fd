"""Daemon mode with real processes: many clients on one listening socket, sharing downloads; access control;
per-connection limits; SIGTERM and SIGHUP."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import stat
import sys
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.faults.conftest import FaultImages
from tests.faults.proxy import FaultProxy, Stall
from tests.support.documented import README, number

HANG_GUARD = 120.0
CLIENTS = 50


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def non_tcp_fds(pid: int) -> list[str]:
    """The daemon's open fds, except TCP sockets (the registry connection pool keeps idle ones, by design)."""
    tcp_inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            tcp_inodes.add(line.split()[9])
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m and m.group(1) in tcp_inodes:
            continue
        fds.append(target)
    return sorted(fds)


async def pull_all_layers(path: Path, ref: str, layers) -> list[str]:
    async with ImageProxy.connect(path) as proxy:
        img = await proxy.open_image(ref)
        return [sha256(await proxy.get_blob(img, layer.digest, layer.size)) for layer in layers]


# --------------------------------------------------------------------------------------------- sharing


async def test_fifty_clients_share_one_download_per_blob(
    start_daemon, fault_images: FaultImages, fault: FaultProxy, tmp_path
):
    daemon = await start_daemon("--blob-cache", str(tmp_path / "cache"))
    layers = [fault_images.seed, fault_images.long, fault_images.small]
    ref = fault_images.ref(fault.port)
    fds_before = non_tcp_fds(daemon.pid)
    results: list[list[str]] = []
    peak_rss = daemon.rss_bytes()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                results.append(await pull_all_layers(daemon.socket_path, ref, layers))

            for _ in range(CLIENTS):
                nursery.start_soon(client)
            while len(results) < CLIENTS and daemon.process.returncode is None:
                peak_rss = max(peak_rss, daemon.rss_bytes())
                await trio.sleep(0.05)  # sampling the daemon's RSS while it works, not synchronising
        await daemon.wait_for(
            lambda: sum("closed" in line for line in daemon.log) >= CLIENTS, f"{CLIENTS} connections closed"
        )
    assert results == [[layer.digest for layer in layers]] * CLIENTS
    for layer in layers:
        # one download per blob: the body bytes sent for it add up to its size. A transfer that stalls in this busy
        # test process resumes from what the daemon received: at most the bytes in flight again, never the blob.
        requests = fault.requests_for(f"/blobs/{layer.digest}$")
        sent = sum(r.body_sent for r in requests)
        assert layer.size <= sent < layer.size * 3 // 2, (
            f"{layer.digest}: {sent} bytes for a {layer.size}-byte blob in {len(requests)} requests "
            f"{[(r.range, r.status, r.body_sent) for r in requests]}\n" + "\n".join(daemon.log)
        )
    assert peak_rss < 200 << 20, f"daemon RSS peaked at {peak_rss >> 20} MiB"
    assert non_tcp_fds(daemon.pid) == fds_before
    assert len(re.findall(r"connection from pid \d+ uid \d+", "\n".join(daemon.log))) >= CLIENTS


async def test_the_listening_socket_has_the_mode_and_group_asked_for(start_daemon, single):
    gid = os.getgid() if os.getgid() != 0 else 4242
    daemon = await start_daemon("--no-blob-cache", "--socket-mode", "0640", "--socket-group", str(gid))
    st = daemon.socket_path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == gid
    default = await restart_with_defaults(daemon, start_daemon)
    assert stat.S_IMODE(default.socket_path.lstat().st_mode) == 0o660


async def restart_with_defaults(daemon, start_daemon):
    daemon.signal(signal.SIGTERM)
    assert await daemon.exit_code(10) == 0
    assert not daemon.socket_path.exists(), "the daemon removes the socket it made"
    return await start_daemon("--no-blob-cache")


async def test_a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced(start_daemon, socket_dir):
    first = await start_daemon("--no-blob-cache")
    second = await start_daemon("--no-blob-cache", wait=False)
    assert await second.exit_code(30) == 1
    assert any("another process is already listening on" in line for line in second.log)
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    assert first.socket_path.exists()  # killed: the socket file stays behind
    third = await start_daemon("--no-blob-cache")
    await third.wait_for_log("removing the stale socket")
    (socket_dir / "plain-file").write_text("not a socket")
    fourth = await start_daemon("--no-blob-cache", "--listen", str(socket_dir / "plain-file"), wait=False)
    assert await fourth.exit_code(30) == 1
    assert (socket_dir / "plain-file").read_text() == "not a socket"


# --------------------------------------------------------------------------------------------- access control


def connect_as(path: Path, uid: int, gid: int) -> dict:
    """Initialize over the daemon's socket from a forked child running as uid:gid (no exec: the test's Python
    may live where other users cannot read it); the reply, ``{"reply": None}`` when closed without one, or the
    connect error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, then _exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(20)
            try:
                s.connect(str(path))
            except OSError as e:
                os.write(write_end, b"E" + (e.strerror or "").encode())
                os._exit(0)
            try:
                s.send(b'{"method":"Initialize","args":[]}')
                reply = s.recv(32768)
            except (BrokenPipeError, ConnectionResetError):  # closed before or after our request
                reply = b""
            os.write(write_end, b"R" + reply)
        except BaseException as e:
            os.write(write_end, b"X" + repr(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as result:
        data = result.read()
    os.waitpid(pid, 0)
    if data.startswith(b"E"):
        return {"error": data[1:].decode()}
    assert data.startswith(b"R"), data  # else X and the child's exception
    return {"reply": json.loads(data[1:]) if data[1:] else None}


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.fail("the access-control tests switch users: they need root (CI runs as root)")


async def test_a_peer_not_on_the_allow_list_is_refused(root_only, start_daemon):
    daemon = await start_daemon("--no-blob-cache", "--allow-uid", "4242", "--socket-group", "4343")
    allowed = connect_as(daemon.socket_path, 4242, 4343)
    assert allowed["reply"]["success"] and allowed["reply"]["value"] == "0.2.8"
    refused = connect_as(daemon.socket_path, 4444, 4343)
    assert refused == {"reply": None}  # closed without a word
    line = await daemon.wait_for_log(r"refused connection from pid \d+ uid 4444 gid 4343")
    assert "not on the allow-list" in line
    outsider = connect_as(daemon.socket_path, 4545, 4545)
    assert outsider == {"error": "Permission denied"}  # mode 0660: not even a connection
    with pytest.raises(ProxyError):  # root is not on the list either
        async with ImageProxy.connect(daemon.socket_path):
            pass


async def test_a_group_on_the_allow_list_admits_its_members(root_only, start_daemon):
    daemon = await start_daemon("--no-blob-cache", "--allow-gid", "4343", "--socket-group", "4343")
    assert (connect_as(daemon.socket_path, 4646, 4343))["reply"]["success"]
    assert (connect_as(daemon.socket_path, 4646, 4747)) == {"error": "Permission denied"}


# --------------------------------------------------------------------------------------------- limits


async def test_each_limit_gives_its_error_while_another_client_finishes(start_daemon, tmp_path, single, big):
    config = tmp_path / "config.toml"
    config.write_text(
        "[limits]\nopen-images = 2\nopen-pipes = 1\nrequests-per-second = 1\nrequest-burst = 12\n"
        "max-request-size = 1024\n"
    )
    daemon = await start_daemon("--no-blob-cache", "--config", str(config))
    layer = big.layers[0]
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as greedy, ImageProxy.connect(daemon.socket_path) as other:
            images = [await greedy.open_image(single.ref), await greedy.open_image(single.ref)]
            with pytest.raises(ProxyError, match=r"2 images are open, this connection's limit; close some"):
                await greedy.open_image(single.ref)
            reply, fds = await greedy.call("GetBlob", [images[0], layer.digest, layer.size])
            assert reply.success  # the one pipe allowed, left unfinished
            second, more_fds = await greedy.call("GetManifest", [images[1]])
            assert not second.success and "too many open pipes (1 is this connection's limit)" in second.error
            reply_big, _ = await greedy.call("OpenImage", ["oci:" + "x" * 2000])
            assert "exceeds this server's 1024 byte request limit" in reply_big.error

            # the other client is not affected by any of this
            img = await other.open_image(big.ref)
            assert sha256(await other.get_blob(img, layer.digest, layer.size)) == layer.digest

            for fd in fds + more_fds:
                os.close(fd)
            limited = None
            for _ in range(20):  # a burst of 12 at 1/s: this many are over it well within a second
                reply, fds = await greedy.call("GetLayerInfo", [images[1]])
                if not reply.success:
                    limited = reply
                    break
            assert limited is not None and limited.error_code == "retryable"
            assert "request rate limit exceeded (1 requests per second, bursts of 12)" in limited.error
    assert daemon.process.returncode is None


# --------------------------------------------------------------------------------------------- signals


async def test_sigterm_gives_a_transfer_in_flight_its_grace_then_exits_0(start_daemon, big):
    daemon = await start_daemon("--no-blob-cache", "--shutdown-grace", "20")
    layer = big.layers[0]
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            img = await proxy.open_image(big.ref)
            reply, (fd,) = await proxy.call("GetBlob", [img, layer.digest, layer.size])
            daemon.signal(signal.SIGTERM)
            await daemon.wait_for(lambda: "STOPPING=1" in daemon.notifications, "STOPPING=1")
            await daemon.wait_for_log("1 connection\\(s\\) get up to 20s")
            with pytest.raises(ProxyError):  # no new connections
                async with ImageProxy.connect(daemon.socket_path):
                    pass
            data = b""
            async with trio.lowlevel.FdStream(fd) as stream:

                async def drain() -> None:
                    nonlocal data
                    while chunk := await stream.receive_some(1 << 20):
                        data += chunk

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain)
                    await proxy.finish_pipe(reply.pipeid)
            assert sha256(data) == layer.digest
        assert await daemon.exit_code(10) == 0


async def test_sigterm_cancels_a_stalled_transfer_after_the_grace(start_daemon, fault_images, fault):
    daemon = await start_daemon("--no-blob-cache", "--shutdown-grace", "1", "--stall-timeout", "60")
    layer = fault_images.long
    fault.add_rule(Stall(at=1 << 20), path=f"/blobs/{layer.digest}$")
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))
            _, (fd,) = await proxy.call("GetBlob", [img, layer.digest, layer.size])
            await fault.wait_until(lambda: bool(fault.busy_connections))
            daemon.signal(signal.SIGTERM)
            started = trio.current_time()
            assert await daemon.exit_code(10) == 0
            assert trio.current_time() - started < 1 + 2.0  # the grace, plus a generous margin for a loaded machine
            os.close(fd)
    assert any("grace period over: cancelling 1 connection(s)" in line for line in daemon.log)


#: README: "SIGTERM (or SIGINT): stop accepting, give transfers in flight `--shutdown-grace` (10 s) to finish, cancel
#: the rest, exit 0; a second SIGTERM cancels at once"
DEFAULT_GRACE = number(
    README,
    r"give transfers in flight `--shutdown-grace` \((\d+) s\) to finish, cancel the rest, exit 0; "
    r"a second SIGTERM cancels at once",
)
#: "at once": well under the grace, with room for a loaded machine (as EXIT_BOUND elsewhere)
AT_ONCE = 2.0


async def test_a_second_sigterm_cancels_the_transfers_in_flight_at_once(start_daemon, big):
    """With the default grace (README's 10 s), a transfer nobody reads keeps the daemon after the first SIGTERM;
    the second ends it at once, exit 0."""
    assert DEFAULT_GRACE == 10 and AT_ONCE < DEFAULT_GRACE / 2
    daemon = await start_daemon("--no-blob-cache")
    layer = big.layers[0]
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            img = await proxy.open_image(big.ref)
            _, (fd,) = await proxy.call("GetBlob", [img, layer.digest, layer.size])  # never read: in flight
            try:
                daemon.signal(signal.SIGTERM)
                await daemon.wait_for_log(f"1 connection\\(s\\) get up to {DEFAULT_GRACE}s to finish")
                assert daemon.process.returncode is None, "the first SIGTERM waits for the transfer"
                daemon.signal(signal.SIGTERM)
                started = trio.current_time()
                with trio.fail_after(DEFAULT_GRACE + 10):  # a hang guard: a daemon ignoring it exits after the grace
                    code = await daemon.process.wait()
                elapsed = trio.current_time() - started
            finally:
                os.close(fd)
    assert code == 0
    assert elapsed < AT_ONCE, f"the second SIGTERM took {elapsed:.1f} s to end the daemon"
    await daemon.wait_for(lambda: daemon.log_ended.is_set(), "the end of the log")
    assert any("stopping now: cancelling 1 connection(s)" in line for line in daemon.log), daemon.log


async def test_sighup_reloads_the_configuration_for_new_connections(start_daemon, tmp_path, single):
    config = tmp_path / "config.toml"
    config.write_text("[limits]\nopen-images = 5\n")
    daemon = await start_daemon("--no-blob-cache", "--config", str(config))
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as before:
            await before.open_image(single.ref)
            config.write_text("[limits]\nopen-images = 1\n")
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for_log("configuration reloaded")
            await before.open_image(single.ref)  # an open connection keeps the limits it started with
            async with ImageProxy.connect(daemon.socket_path) as after:
                await after.open_image(single.ref)
                with pytest.raises(ProxyError, match="1 images are open"):
                    await after.open_image(single.ref)

            config.write_text("[limits]\nopen-images = 'many'\n")
            daemon.signal(signal.SIGHUP)
            line = await daemon.wait_for_log("configuration not reloaded")
            assert "[limits] open-images must be a number" in line
            async with ImageProxy.connect(daemon.socket_path) as still:
                await still.open_image(single.ref)
                with pytest.raises(ProxyError, match="1 images are open"):
                    await still.open_image(single.ref)
    assert daemon.process.returncode is None


async def test_a_bad_config_file_stops_the_start_with_its_reason(start_daemon, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\nsocket-mode = 660\n")
    daemon = await start_daemon("--config", str(config), wait=False)
    assert await daemon.exit_code(30) == 2
    assert any("[daemon] socket-mode must be an octal mode" in line for line in daemon.log)


# --------------------------------------------------------------------------------------------- logs


async def test_log_lines_carry_journald_priorities_under_systemd(start_daemon, single):
    daemon = await start_daemon("--no-blob-cache", env={"JOURNAL_STREAM": "8:1234"})
    async with ImageProxy.connect(daemon.socket_path) as proxy:
        with pytest.raises(ProxyError):
            await proxy.open_image("oci:/nonexistent/layout:latest")
    daemon.signal(signal.SIGTERM)
    assert await daemon.exit_code(10) == 0
    assert daemon.log and all(re.match(r"<[2-7]>[A-Z]+ ", line) for line in daemon.log), daemon.log
    assert any(line.startswith("<6>INFO image-proxy.server.daemon: serving on ") for line in daemon.log)


async def test_credentials_never_reach_a_client(start_daemon, fault_images, tmp_path):
    secret = "s3cret-Passw0rd-never-shown"
    registry = f"127.0.0.1:{fault_images.registry_port}"
    daemon = await start_daemon("--no-blob-cache", "--creds", f"someone:{secret}")
    texts = []
    async with ImageProxy.connect(daemon.socket_path) as proxy:
        for ref in (f"docker://{registry}/test/faults:latest", f"docker://{registry}/no/such:thing"):
            try:
                img = await proxy.open_image(ref)
                texts.append(str(await proxy.get_manifest(img)))
                await proxy.get_blob(img, "sha256:" + "0" * 64, 1)
            except ProxyError as e:
                texts.append(str(e))
    assert texts and not any(secret in text for text in texts)
    assert not any(secret in line for line in daemon.log)


# --------------------------------------------------------------------------------------------- disconnects


async def read_until(stream: trio.lowlevel.FdStream, have: bytearray, count: int) -> None:
    while len(have) < count:
        chunk = await stream.receive_some(1 << 20)
        assert chunk, f"the pipe ended after {len(have)} bytes"
        have += chunk


async def test_a_shared_download_outlives_the_client_that_started_it_and_stops_with_the_last(
    start_daemon, fault_images, fault, tmp_path
):
    """Two clients read one blob; it stalls at 2 MiB. The first client leaves: the download goes on for the
    second, resuming where it stalled (no byte twice)."""
    cache = tmp_path / "cache"
    daemon = await start_daemon("--blob-cache", str(cache), "--stall-timeout", "2")
    layer = fault_images.long
    cut = 2 << 20
    fault.add_rule(Stall(at=cut), path=f"/blobs/{layer.digest}$", nth=1)
    ref = fault_images.ref(fault.port)
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as keeps:
            img = await keeps.open_image(ref)
            reply, (fd,) = await keeps.call("GetBlob", [img, layer.digest, layer.size])
            kept = bytearray()
            async with trio.lowlevel.FdStream(fd) as stream:
                async with ImageProxy.connect(daemon.socket_path) as leaves:
                    other = await leaves.open_image(ref)
                    _, (other_fd,) = await leaves.call("GetBlob", [other, layer.digest, layer.size])
                    async with trio.lowlevel.FdStream(other_fd) as other_stream:
                        await read_until(other_stream, bytearray(), cut)  # both follow the same download
                    await read_until(stream, kept, cut)
                # `leaves` is gone mid-transfer; `keeps` reads the rest
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_until, stream, kept, layer.size)
                    await keeps.finish_pipe(reply.pipeid)
            assert bytes(kept) == layer.data
    requests = fault.requests_for(f"/blobs/{layer.digest}$")
    assert [r.range for r in requests] == [None, f"bytes={cut}-"]
    assert sum(r.body_sent for r in requests) == layer.size


async def test_a_download_whose_last_reader_leaves_is_stopped(start_daemon, fault_images, fault, tmp_path):
    """The registry stalls for good; the only reader leaves: the daemon closes the registry connection at once
    (long before its 60 s stall deadline would) and keeps the partial file for the next pull."""
    cache = tmp_path / "cache"
    daemon = await start_daemon("--blob-cache", str(cache), "--stall-timeout", "60")
    seed = fault_images.seed
    cut = 2 << 20
    fault.add_rule(Stall(at=cut), path=f"/blobs/{seed.digest}$", nth=1)
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as lonely:
            img = await lonely.open_image(fault_images.ref(fault.port))
            _, (fd,) = await lonely.call("GetBlob", [img, seed.digest, seed.size])
            async with trio.lowlevel.FdStream(fd) as stream:
                await read_until(stream, bytearray(), cut)
    (first,) = fault.requests_for(f"/blobs/{seed.digest}$")
    with trio.fail_after(30):  # half the stall deadline: only the reader leaving can end the request this soon
        await first.finished.wait()
    partial = cache / "blobs" / "sha256" / (seed.digest.split(":")[1] + ".partial")
    assert partial.stat().st_size == cut
    assert len(fault.requests_for(f"/blobs/{seed.digest}$")) == 1
    assert daemon.process.returncode is None


async def test_copy_through_a_running_daemon(start_daemon, tmp_path):
    """`image-proxy copy --proxy-socket` uses the daemon instead of starting a proxy; the layout it writes is the
    example image, byte for byte."""
    daemon = await start_daemon("--no-blob-cache")
    example = Path(__file__).resolve().parents[2] / "examples" / "hello"
    out = tmp_path / "copy"
    command = [sys.executable, "-m", "proxy", "copy", "--quiet", "--proxy-socket", str(daemon.socket_path)]
    done = await trio.run_process(
        [*command, f"oci:{example}:latest", f"oci:{out}:latest"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    for blob in (example / "blobs" / "sha256").iterdir():
        assert (out / "blobs" / "sha256" / blob.name).read_bytes() == blob.read_bytes()
    await daemon.wait_for_log(r"connection from pid \d+ uid \d+ gid \d+ \(python")
