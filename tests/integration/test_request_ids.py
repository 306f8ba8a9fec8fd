"""The request-ids extension on the wire: requests with an id are answered as they finish, with their id;
requests without one keep the in-order semantics of protocol 0.2.8, on the same connection."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from protocol.client import DEFAULT_ARGV
from protocol.extensions import SERVER_EXTENSIONS

EXIT_BOUND = 10


def send(sock: socket.socket, method: str, *args, id: object = None) -> None:
    doc: dict = {"method": method, "args": list(args)}
    if id is not None:
        doc["id"] = id
    sock.send(json.dumps(doc).encode())


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, flags, _ = socket.recv_fds(sock, 32768, 4)
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    return json.loads(msg), fds


def call(sock: socket.socket, method: str, *args, id: object = None) -> tuple[dict, list[int]]:
    send(sock, method, *args, id=id)
    return receive(sock)


def drain(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    os.close(fd)
    return b"".join(parts)


@pytest.fixture
def session():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen([*DEFAULT_ARGV], stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(30)
    try:
        assert call(ours, "Initialize")[0]["value"] == "0.2.8"
        yield ours
        send(ours, "Shutdown")
        assert process.wait(timeout=EXIT_BOUND) == 0
    finally:
        process.kill()
        process.wait()
        ours.close()


def test_the_extension_is_listed():
    assert "request-ids" in SERVER_EXTENSIONS


def test_a_waiting_finish_pipe_with_an_id_does_not_delay_other_calls(session, big):
    """FinishPipe of a blob nobody reads yet waits; calls with and without ids are answered meanwhile."""
    opened, _ = call(session, "OpenImage", big.ref, id=10)
    assert opened["id"] == 10 and opened["success"]
    img = opened["value"]
    layer = big.layers[0]
    blob, (blob_fd,) = call(session, "GetBlob", img, layer.digest, layer.size, id=11)
    assert blob["id"] == 11 and blob["value"] == layer.size
    send(session, "FinishPipe", blob["pipeid"], id=12)  # blocks: the pipe is full, nobody reads it

    manifest, (fd,) = call(session, "GetManifest", img, id=13)
    assert manifest["id"] == 13 and manifest["value"] == big.manifest_digest
    send(session, "FinishPipe", manifest["pipeid"], id=14)  # closes the pipe's write end
    assert drain(fd) == big.manifest
    assert receive(session)[0]["id"] == 14
    plain, (fd,) = call(session, "GetManifest", img)  # no id: in order, and not behind the waiting FinishPipe
    assert "id" not in plain and plain["value"] == big.manifest_digest
    send(session, "FinishPipe", plain["pipeid"])
    assert drain(fd) == big.manifest
    finish_plain = receive(session)[0]
    assert "id" not in finish_plain and finish_plain["success"]

    assert len(drain(blob_fd)) == layer.size
    finished, fds = receive(session)
    assert finished == {"success": True, "value": None, "pipeid": 0, "error_code": "", "error": "", "id": 12}
    assert fds == []


def test_replies_without_ids_stay_in_request_order(session, single):
    img = call(session, "OpenImage", single.ref)[0]["value"]
    send(session, "GetLayerInfo", img)
    send(session, "CloseImage", 999)
    send(session, "GetLayerInfo", img)
    first, second, third = receive(session)[0], receive(session)[0], receive(session)[0]
    assert first["success"] and third["success"] and first["value"] == third["value"]
    assert second["error"] == "no image 999"
    assert all("id" not in r for r in (first, second, third))


def test_every_reply_to_an_id_carries_it_as_the_sixth_key(session, single):
    reply, _ = call(session, "OpenImage", single.ref, id=0)
    assert list(reply) == ["success", "value", "pipeid", "error_code", "error", "id"] and reply["id"] == 0
    failed, _ = call(session, "GetBlob", reply["value"], "sha256:zz", 1, id=2**53 - 1)
    assert not failed["success"] and failed["id"] == 2**53 - 1 and "invalid digest" in failed["error"]
    unknown, _ = call(session, "Frobnicate", id=7.0)
    assert unknown["id"] == 7 and unknown["error"] == "unknown method: Frobnicate"
    bad_args, _ = call(session, "GetManifest", id=8)
    assert bad_args["id"] == 8 and "expecting one argument" in bad_args["error"]


@pytest.mark.parametrize("bad_id", [-1, 1.5, "7", True, None, [1], 2**53])
def test_a_malformed_id_is_an_in_order_error_without_an_id(session, bad_id):
    session.send(json.dumps({"method": "GetCapabilities", "args": [], "id": bad_id}).encode())
    reply, _ = receive(session)
    assert not reply["success"] and "id" not in reply
    assert '"id" must be an integer from 0 to 2^53-1' in reply["error"]
    assert call(session, "GetCapabilities")[0]["value"] == list(SERVER_EXTENSIONS)


def test_an_id_already_in_flight_is_refused_and_the_first_request_still_answered(session, big):
    img = call(session, "OpenImage", big.ref)[0]["value"]
    layer = big.layers[0]
    blob, (blob_fd,) = call(session, "GetBlob", img, layer.digest, layer.size)
    send(session, "FinishPipe", blob["pipeid"], id=5)  # waits until the pipe is read
    duplicate, _ = call(session, "GetManifest", img, id=5)
    assert duplicate["id"] == 5 and duplicate["error"] == "request id 5 is already in use"
    second_finish, _ = call(session, "FinishPipe", blob["pipeid"], id=6)
    assert "is already being finished" in second_finish["error"]
    assert len(drain(blob_fd)) == layer.size
    assert receive(session)[0] == {
        "success": True,
        "value": None,
        "pipeid": 0,
        "error_code": "",
        "error": "",
        "id": 5,
    }
    # the id is free again once answered
    reply, (fd,) = call(session, "GetManifest", img, id=5)
    assert reply["id"] == 5 and reply["success"]
    send(session, "FinishPipe", reply["pipeid"], id=5)
    assert drain(fd) == big.manifest
    assert receive(session)[0]["id"] == 5


def test_shutdown_with_an_id_gets_no_reply_and_ends_the_process(big):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen([*DEFAULT_ARGV], stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(30)
    try:
        call(ours, "Initialize")
        img = call(ours, "OpenImage", big.ref)[0]["value"]
        layer = big.layers[0]
        blob, (fd,) = call(ours, "GetBlob", img, layer.digest, layer.size, id=1)
        send(ours, "FinishPipe", blob["pipeid"], id=2)
        send(ours, "Shutdown", id=3)
        assert process.wait(timeout=EXIT_BOUND) == 0
        os.close(fd)
        assert ours.recv(32768) == b""  # no reply to Shutdown; FinishPipe was cancelled with the session
    finally:
        process.kill()
        process.wait()
        ours.close()
