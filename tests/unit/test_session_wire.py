"""A session reads and answers through a duplicate of its socket (no trip through trio's socket wrapper); when
the process has no descriptor left for that duplicate, it serves through trio's socket alone, the same way."""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from pathlib import Path

import pytest
import trio

from protocol.codec import decode_reply, encode_request
from protocol.messages import Reply, Request
from proxy.server import session as session_module
from proxy.server.session import serve_socket
from tests.integration.test_reply_pipes import digest, write_layout
from tests.unit.test_deep_json import options


async def call(sock: trio.socket.SocketType, method: str, *args: object) -> tuple[Reply, list[int]]:
    """One request: the reply and the fds that came with it."""
    await sock.send(encode_request(Request(method, list(args))))
    data, ancdata, _, _ = await sock.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    return decode_reply(data), fds


async def pull_manifests(tmp_path: Path) -> None:
    ref, manifest = write_layout(tmp_path / "layout", 100)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_socket, theirs, options(tmp_path))
            with trio.socket.from_stdlib_socket(ours) as sock:
                assert (await call(sock, "Initialize"))[0].success
                opened, _ = await call(sock, "OpenImage", ref)
                assert opened.success, opened
                for _ in range(5):
                    reply, fds = await call(sock, "GetManifest", opened.value)
                    assert reply.success and reply.value == digest(manifest) and len(fds) == 1
                    finished, _ = await call(sock, "FinishPipe", reply.pipeid)
                    assert finished.success
                    with open(fds[0], "rb") as pipe:  # FinishPipe closed the write end: this ends
                        assert pipe.read() == manifest


async def test_a_session_serves_through_its_duplicate(tmp_path: Path) -> None:
    await pull_manifests(tmp_path)


async def test_without_a_descriptor_for_the_duplicate_the_session_serves_through_trio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_descriptor_left(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(session_module.os, "dup", no_descriptor_left)
    caplog.set_level(logging.WARNING)
    await pull_manifests(tmp_path)
    assert any("cannot duplicate a connection's socket" in r.getMessage() for r in caplog.records)
