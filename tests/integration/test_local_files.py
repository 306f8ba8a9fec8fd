"""Issue 13, part 6: local files are opened without blocking. A FIFO where a blob, an ``index.json`` or a ``dir:``
manifest is expected is an error naming the path and saying it is a FIFO, at once (a plain ``open()`` would wait
for a writer forever, holding a worker thread); forty such opens in flight do not delay a good one; and a spawned
proxy (``python -m proxy experimental-image-proxy``, driven by tests/support/wire.py) ends within a second of
Shutdown or of its socket closing, whatever its layouts hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.support.hostile import FifoImages, fifo_images
from tests.support.wire import ProxyProcess, close_fds, encode

#: "at once": an error about a FIFO comes back within this (it takes milliseconds; slack for a loaded machine)
AT_ONCE = 2.0
#: the spawned process is gone this long after Shutdown or EOF
EXIT_BOUND = 1.0
#: every receive of the wire driver is bounded by this (a FIFO waited on would hang the call: this fails it)
TIMEOUT = 10.0
IN_FLIGHT = 40
#: a blob far larger than any pipe buffer, sparse on disk
SPARSE_SIZE = 4 << 30


@pytest.fixture
def fifos(tmp_path: Path, single) -> FifoImages:
    return fifo_images(tmp_path / "fifos", single.path, single.tag, single.layers[0].digest)


@pytest.fixture
def sparse_blob(fifos: FifoImages) -> tuple[str, int]:
    """A 4 GiB sparse file in the FIFO-blob layout, named as a blob (its digest is not its content's: the transfer
    is never meant to end)."""
    digest = "sha256:" + hashlib.sha256(b"sparse").hexdigest()
    path = fifos.blob_path.parent / digest.split(":", 1)[1]
    with path.open("wb") as f:
        f.truncate(SPARSE_SIZE)
    return digest, SPARSE_SIZE


def spawn(argv: list[str]) -> ProxyProcess:
    proxy = ProxyProcess.spawn(argv, timeout=TIMEOUT)
    proxy.initialize()
    return proxy


def failure_text(reply: dict, finish: dict | None) -> str:
    """The error of a call that must fail: its own, or (if it was answered with a pipe) FinishPipe's."""
    if not reply["success"]:
        return reply["error"]
    assert finish is not None and not finish["success"], f"the call succeeded: {reply} {finish}"
    return finish["error"]


def assert_names_the_fifo(error: str, path: Path) -> None:
    assert str(path) in error, f"the error does not name {path}: {error}"
    assert "FIFO" in error, f"the error does not say {path} is a FIFO: {error}"


# --------------------------------------------------------------------------------------------- each FIFO


def test_a_blob_that_is_a_fifo_is_an_error_naming_it_at_once(our_proxy_argv, fifos, single):
    layer = single.layers[0]
    with spawn(our_proxy_argv) as proxy:
        img = proxy.call_ok("OpenImage", [fifos.blob_layout])  # index, manifest and config are regular files
        started = time.monotonic()
        reply, data, finish = proxy.call_piped("GetBlob", [img, layer.digest, layer.size])
        took = time.monotonic() - started
        assert data == b""
        assert_names_the_fifo(failure_text(reply, finish), fifos.blob_path)
        assert took < AT_ONCE, f"GetBlob of a FIFO took {took:.1f} s"

        reply, data, err = proxy.get_raw_blob(img, layer.digest)
        error = reply["error"] if not reply["success"] else json.loads(err)["message"]
        assert_names_the_fifo(error, fifos.blob_path)
        assert data == b""
        # the rest of the image is still served
        _, manifest, finish = proxy.call_piped("GetManifest", [img])
        assert finish is not None and finish["success"] and json.loads(manifest)["layers"]


def test_an_index_json_that_is_a_fifo_is_an_error_naming_it_at_once(our_proxy_argv, fifos):
    with spawn(our_proxy_argv) as proxy:
        started = time.monotonic()
        _, reply, fds = proxy.call("OpenImage", [fifos.index_layout])
        took = time.monotonic() - started
        close_fds(fds)
        assert not reply["success"] and not fds
        assert_names_the_fifo(reply["error"], fifos.index_path)
        assert took < AT_ONCE, f"OpenImage took {took:.1f} s"


def test_a_dir_manifest_that_is_a_fifo_is_an_error_naming_it_at_once(our_proxy_argv, fifos):
    with spawn(our_proxy_argv) as proxy:
        started = time.monotonic()
        _, reply, fds = proxy.call("OpenImage", [fifos.dir_image])
        took = time.monotonic() - started
        close_fds(fds)
        assert not reply["success"] and not fds
        assert_names_the_fifo(reply["error"], fifos.manifest_path)
        assert took < AT_ONCE, f"OpenImage took {took:.1f} s"


# --------------------------------------------------------------------------------------------- many in flight


def fifo_requests(fifos: FifoImages, first_id: int = 1) -> list[tuple[bytes, Path]]:
    """IN_FLIGHT requests with ids, each of which meets a FIFO: (packet, the FIFO its error must name)."""
    kinds = [
        ("OpenImage", [fifos.index_layout], fifos.index_path),
        ("OpenImage", [fifos.dir_image], fifos.manifest_path),
        ("OpenImage", [f"oci-archive:{fifos.fifo}"], fifos.fifo),
        ("OpenImage", [f"docker-archive:{fifos.fifo}"], fifos.fifo),
    ]
    out = []
    for n in range(IN_FLIGHT):
        method, args, path = kinds[n % len(kinds)]
        packet = json.dumps({"method": method, "args": args, "id": first_id + n}).encode()
        out.append((packet, path))
    return out


def test_forty_fifo_opens_in_flight_do_not_delay_a_good_open(our_proxy_argv, fifos, single):
    with spawn(our_proxy_argv) as proxy:
        requests = fifo_requests(fifos)
        for packet, _ in requests:
            proxy.send_raw(packet)
        good_id = IN_FLIGHT + 1
        started = time.monotonic()
        proxy.send_raw(json.dumps({"method": "OpenImage", "args": [single.ref], "id": good_id}).encode())
        replies: dict[int, dict] = {}
        good_after = None
        while len(replies) < IN_FLIGHT + 1:
            raw, fds = proxy.receive()
            close_fds(fds)
            reply = json.loads(raw)
            assert reply["id"] not in replies, f"two replies with id {reply['id']}"
            replies[reply["id"]] = reply
            if reply["id"] == good_id:
                good_after = time.monotonic() - started
        assert replies[good_id]["success"], replies[good_id]
        assert good_after is not None and good_after < AT_ONCE, f"the good OpenImage took {good_after:.1f} s"
        for n, (_, path) in enumerate(requests, start=1):
            assert not replies[n]["success"]
            assert_names_the_fifo(replies[n]["error"], path)


# --------------------------------------------------------------------------------------------- the end


@pytest.mark.parametrize("ending", ["Shutdown", "socket closed"])
def test_the_process_ends_within_a_second_whatever_its_layouts_hold(our_proxy_argv, fifos, single, sparse_blob, ending):
    """In flight when the client ends it: a 4 GiB transfer whose pipe nobody reads, GetBlob of a FIFO blob, and
    forty opens of FIFOs."""
    digest, size = sparse_blob
    with spawn(our_proxy_argv) as proxy:
        img = proxy.call_ok("OpenImage", [fifos.blob_layout])
        _, reply, unread = proxy.call("GetBlob", [img, digest, size])
        assert reply["success"] and len(unread) == 1, reply
        assert proxy.read_some(unread[0])  # the transfer is under way, and stays stuck on the full pipe
        layer = single.layers[0]
        proxy.send_raw(json.dumps({"method": "GetBlob", "args": [img, layer.digest, layer.size], "id": 100}).encode())
        for packet, _ in fifo_requests(fifos, first_id=101):
            proxy.send_raw(packet)
        started = time.monotonic()
        if ending == "Shutdown":
            proxy.send_raw(encode("Shutdown", []))
        else:
            proxy.sock.close()
        code = proxy.process.wait(timeout=TIMEOUT)
        took = time.monotonic() - started
        close_fds(unread)
        stderr = proxy.stderr_text()
    print(f"\n{ending}: the spawned proxy exited ({code}) {took * 1000:.0f} ms later")
    assert took < EXIT_BOUND, f"the proxy took {took:.2f} s to exit after {ending}; stderr:\n{stderr[-2000:]}"
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert os.path.exists(fifos.blob_path)  # the FIFO is untouched
