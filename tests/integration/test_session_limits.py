"""docs/PROTOCOL.md's two numbered rules of a connection's queue, on a spawned proxy over a raw socket:

- "At most 32 such requests [with ids] of one connection are at work at a time; more wait for a slot while the
  socket keeps being read."
- "A client that sends more than 4096 requests without reading replies is disconnected."

The numbers are read from docs/PROTOCOL.md (tests/support/documented.py). Requests are held "at work" by FinishPipe
of a blob whose pipe nobody reads (the 2 MiB ``big`` layer cannot fit in a pipe): it cannot finish before the test
reads that pipe, so no timing decides anything. Every socket wait has a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from protocol.client import DEFAULT_ARGV
from tests.support.documented import PROTOCOL, number

#: docs/PROTOCOL.md: "At most 32 such requests of one connection are at work at a time"
AT_WORK = number(PROTOCOL, r"At most (\d+) such requests of one connection are at work at a time")
#: docs/PROTOCOL.md: "A client that sends more than 4096 requests without reading replies is disconnected"
UNREAD = number(PROTOCOL, r"A client that sends more than (\d+) requests without reading replies is disconnected")
#: the deadline on every socket wait and on the process's exit
DEADLINE = 30.0


def send(sock: socket.socket, method: str, *args: object, id: int | None = None) -> None:
    doc: dict = {"method": method, "args": list(args)}
    if id is not None:
        doc["id"] = id
    sock.send(json.dumps(doc).encode())


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, flags, _ = socket.recv_fds(sock, 32768, 4)
    assert msg, "the proxy closed the connection"
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    return json.loads(msg), fds


def call(sock: socket.socket, method: str, *args: object) -> tuple[dict, list[int]]:
    send(sock, method, *args)
    return receive(sock)


def drain(fd: int) -> int:
    total = 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
    os.close(fd)
    return total


@pytest.fixture
def proxy():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen([*DEFAULT_ARGV], stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(DEADLINE)
    try:
        assert call(ours, "Initialize")[0]["value"] == "0.2.8"
        yield ours, process
    finally:
        process.kill()
        process.wait()
        ours.close()


def test_at_most_32_requests_with_ids_are_at_work_and_the_next_waits_for_a_slot(proxy, big):
    """31 FinishPipes with ids wait for their pipes: a 32nd request with an id is still answered at once. With 32
    waiting, the next request with an id is answered only after one of them finished; requests without an id are
    answered meanwhile."""
    sock, _ = proxy
    assert AT_WORK == 32
    image = call(sock, "OpenImage", big.ref)[0]["value"]
    layer = big.layers[0]
    pipes: list[tuple[int, int]] = []  # (pipeid, fd)
    for _ in range(AT_WORK):
        reply, (fd,) = call(sock, "GetBlob", image, layer.digest, layer.size)
        pipes.append((reply["pipeid"], fd))

    # 31 at work: one slot left
    for n, (pipeid, _) in enumerate(pipes[:-1], start=1):
        send(sock, "FinishPipe", pipeid, id=n)
    call(sock, "GetCapabilities")  # in order: every request before it was read and its task started
    send(sock, "GetCapabilities", id=1000)
    try:
        answer, _ = receive(sock)
    except TimeoutError:
        pytest.fail(f"a request with an id waited {DEADLINE} s for a slot while {AT_WORK - 1} others were at work")
    assert answer["id"] == 1000 and answer["success"], answer

    # 32 at work: none left
    send(sock, "FinishPipe", pipes[-1][0], id=AT_WORK)
    call(sock, "GetCapabilities")
    send(sock, "GetCapabilities", id=1001)  # waits for a slot
    plain, _ = call(sock, "GetCapabilities")  # no id: answered in its turn, not held up
    assert "id" not in plain and plain["success"], plain

    # the first pipe is read: its FinishPipe ends and frees the slot the waiting request then takes
    assert drain(pipes[0][1]) == layer.size
    first, _ = receive(sock)
    assert first.get("id") == 1, f"a request with an id was answered while {AT_WORK} others were at work: {first}"
    assert first["success"], first
    waiting, _ = receive(sock)
    assert waiting["id"] == 1001 and waiting["success"], waiting

    for _, fd in pipes[1:]:
        assert drain(fd) == layer.size
    finished = sorted(receive(sock)[0]["id"] for _ in pipes[1:])
    assert finished == list(range(2, AT_WORK + 1))


def test_a_client_that_never_reads_its_replies_is_disconnected_after_4096(proxy):
    """Requests sent without reading a reply: up to 4096 unanswered ones the proxy keeps (it answers them all once
    the client reads); past that it ends the session, and the client reads what was sent and then EOF."""
    sock, process = proxy
    assert UNREAD == 4096
    # fewer than the limit, nothing read until all are sent: every one is answered
    below = UNREAD - 1
    for _ in range(below):
        send(sock, "GetCapabilities")
    for _ in range(below):
        reply, _ = receive(sock)
        assert reply["success"], reply
    # past the limit, still reading nothing: the proxy ends the session
    over = UNREAD + 1000
    sent = 0
    try:
        for _ in range(over):
            send(sock, "GetCapabilities")
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass  # the proxy closed its end while we were still sending
    answered = 0
    for _ in range(sent):  # what the proxy sent before it closed, then EOF
        if not sock.recv(32768):
            break
        answered += 1
    assert answered < sent, f"all {sent} requests were answered: the proxy never disconnected"
    assert not sock.recv(32768), "EOF"
    process.wait(timeout=DEADLINE)  # the session is over, and so is the spawned proxy
