"""The daemon's small parts: the socket-activation environment, sd_notify, the allow-list, the log format,
the request-rate bucket."""

from __future__ import annotations

import logging
import socket

import pytest

from protocol.server_connection import RequestRate
from proxy.server import systemd
from proxy.server.logs import OneLineFormatter
from proxy.server.peer import AccessPolicy, PeerCredentials, peer_credentials


def test_listen_fds_reads_count_pid_and_names():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "image-proxy"}
    assert systemd.listen_fds(env, 42) == [(3, "image-proxy"), (4, "unknown")]
    assert systemd.listen_fds(env, 43) == []  # meant for another process
    assert systemd.listen_fds({}, 42) == []
    assert systemd.listen_fds({"LISTEN_FDS": "1"}, 7) == [(3, "unknown")]
    for bad in ({"LISTEN_FDS": "x"}, {"LISTEN_FDS": "1", "LISTEN_PID": "me"}, {"LISTEN_FDS": "-1"}):
        with pytest.raises(systemd.ActivationError):
            systemd.listen_fds(bad, 7)


def test_notify_sends_to_the_socket_and_never_raises(tmp_path):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert listener.recv(100) == b"READY=1"
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative"})


def test_allow_list():
    root = PeerCredentials(1, 0, 0, frozenset({0}))
    member = PeerCredentials(2, 1000, 1000, frozenset({1000, 4343}))
    assert AccessPolicy().allows(root) and AccessPolicy().allows(member)
    assert AccessPolicy(allow_uids=frozenset({0})).allows(root)
    assert not AccessPolicy(allow_uids=frozenset({0})).allows(member)
    assert AccessPolicy(allow_gids=frozenset({4343})).allows(member)  # a supplementary group counts
    assert not AccessPolicy(allow_gids=frozenset({4343})).allows(root)


def test_peer_credentials_of_a_socketpair_are_ours():
    import os

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert os.getgid() in peer.groups and set(os.getgroups()) <= peer.groups


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("image-proxy.server.daemon", level, __file__, 1, message, None, None)


def test_log_lines_are_one_line_with_priorities_for_journald():
    journald = OneLineFormatter(journald=True)
    assert journald.format(record(logging.WARNING, "a\nb")) == "<4>WARNING image-proxy.server.daemon: a | b"
    assert journald.format(record(logging.DEBUG, "x")).startswith("<7>DEBUG")
    assert journald.format(record(logging.ERROR, "x")).startswith("<3>ERROR")
    plain = OneLineFormatter(journald=False).format(record(logging.INFO, "serving"))
    assert plain.startswith("image-proxy[") and plain.endswith("INFO image-proxy.server.daemon: serving")


def test_request_rate_bucket():
    rate = RequestRate(per_second=2, burst=3)
    assert [rate.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow(0.5) and not rate.allow(0.5)  # one token back after half a second
    assert all(RequestRate(None, 1).allow(0.0) for _ in range(1000))
