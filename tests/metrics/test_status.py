"""``image-proxy status`` (issue 19): a real daemon asked over its socket, while a client's transfer is stalled by the
fault proxy in front of the real registry; and who may see whose transfers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from protocol.client import ImageProxy
from proxy.server.metrics import STALLED_AFTER
from tests.faults.conftest import FaultImages
from tests.faults.proxy import FaultProxy, Stall

HANG_GUARD = 60.0
STALL_AT = 1 << 20


async def status(socket_path, *flags: str) -> subprocess.CompletedProcess:
    """``image-proxy status`` run as a command, as an admin would."""
    return await trio.run_process(
        [sys.executable, "-m", "proxy", "status", "--proxy-socket", str(socket_path), *flags],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def stalled_transfer(daemon, fault_images: FaultImages, fault: FaultProxy, nursery: trio.Nursery) -> dict:
    """Start a client whose blob stalls at STALL_AT for good (the stall deadline is long), and poll ``status --json``
    until the transfer shows stalled; its entry."""
    fault.add_rule(Stall(at=STALL_AT), path=fault_images.long.digest)

    async def client() -> None:
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            image = await proxy.open_image(fault_images.ref(fault.port))
            await proxy.get_blob(image, fault_images.long.digest, fault_images.long.size)

    nursery.start_soon(client)
    while True:  # each poll is a real `status --json`; the hang guard bounds it
        done = await status(daemon.socket_path, "--json")
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)["transfers"]["shown"]
        if shown and shown[0]["state"] == "stalled":
            return shown[0]


async def test_status_shows_a_stalled_transfer(start_daemon, fault_images: FaultImages, fault: FaultProxy, tmp_path):
    daemon = await start_daemon("--blob-cache", str(tmp_path / "cache"), "--stall-timeout", "60")
    host = f"127.0.0.1:{fault.port}"
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            transfer = await stalled_transfer(daemon, fault_images, fault, nursery)
            assert transfer["image"] == fault_images.ref(fault.port)
            assert transfer["digest"] == fault_images.long.digest
            assert transfer["method"] == "GetBlob" and transfer["uid"] == 0
            assert transfer["bytes_total"] == fault_images.long.size
            assert 0 < transfer["bytes_sent"] <= STALL_AT
            assert transfer["source"] == "network"
            upstream = transfer["upstream"]
            assert upstream["hosts"] == [host] and upstream["bytes_received"] == STALL_AT
            assert upstream["seconds_since_last_byte"] >= STALLED_AFTER and upstream["resumes"] == 0

            table = await status(daemon.socket_path)
            assert table.returncode == 0, table.stderr
            text = table.stdout.decode()
            assert "TRANSFERS IN FLIGHT: 1" in text and "CONNECTIONS: 2" in text  # the client, and status itself
            row = next(line for line in text.splitlines() if fault_images.long.digest[:19] in line)
            assert row.split()[0] == str(transfer["pid"])
            assert fault_images.ref(fault.port) in row and host in row and row.endswith("stalled")
            assert "1.0 MiB / 4.5 MiB" in row
            assert f"CACHE: {tmp_path / 'cache'}" in text
            nursery.cancel_scope.cancel()  # the client goes away mid-transfer
    line = await daemon.wait_for_log(rf"GetBlob \S+ {fault_images.long.digest}: the client went away")
    assert f"of {fault_images.long.size} bytes to the client" in line and f"({host}: {STALL_AT} bytes received" in line


def get_status_as(socket_path, uid: int, gid: int) -> dict:
    """GetStatus sent by a child process running as ``uid``/``gid`` (the raw protocol): the document it got."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        signal.alarm(30)  # a hang guard: killed, it writes nothing, which fails the test
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(20)
                s.connect(str(socket_path))
                s.send(b'{"method":"GetStatus","args":[]}')
                reply, fds, _, _ = socket.recv_fds(s, 32768, 1)
                value = json.loads(reply)
                # FinishPipe first: the pipe ends (EOF) only once it is finished (the document is in it already)
                s.send(json.dumps({"method": "FinishPipe", "args": [value["pipeid"]]}).encode())
                assert json.loads(s.recv(32768))["success"]
                with os.fdopen(fds[0], "rb") as pipe:
                    document = pipe.read()
            os.write(write_end, document)
        except BaseException as e:
            os.write(write_end, b"X" + repr(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as result:
        data = result.read()
    os.waitpid(pid, 0)
    assert not data.startswith(b"X"), data
    return json.loads(data)


async def test_other_users_transfers_are_shown_only_to_root_and_the_daemons_user(
    start_daemon, fault_images: FaultImages, fault: FaultProxy, tmp_path
):
    if os.geteuid() != 0:
        pytest.fail("this test switches users: it needs root (CI runs as root)")
    daemon = await start_daemon("--no-blob-cache", "--stall-timeout", "60", "--socket-mode", "0666")
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            mine = await stalled_transfer(daemon, fault_images, fault, nursery)
            theirs = await trio.to_thread.run_sync(get_status_as, daemon.socket_path, 4242, 4242)
            assert theirs["details"] == "your uid only"
            assert theirs["transfers"] == {"count": 1, "shown": []}  # counted, not shown: root's
            assert theirs["connections"]["count"] == 2
            assert [c["uid"] for c in theirs["connections"]["shown"]] == [4242]
            assert theirs["connections"]["shown"][0]["you"] is True
            assert theirs["cache"] is None and theirs["limits"]["connection"]["open_pipes"] == 64
            rootview = json.loads((await status(daemon.socket_path, "--json")).stdout)
            assert rootview["details"] == "all users"
            assert [t["digest"] for t in rootview["transfers"]["shown"]] == [mine["digest"]]
            nursery.cancel_scope.cancel()
