"""The client bindings against both servers: ours, and the real skopeo proxy (0.2.3 in Debian)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess

import pytest
import trio

from protocol.client import DEFAULT_ARGV, ImageProxy, ProxyClosed
from protocol.client.sync import SyncImageProxy
from protocol.errors import ProxyError


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_bindings_read_an_image_through_skopeo(single, skopeo_proxy_argv):
    async with ImageProxy.spawn(skopeo_proxy_argv) as proxy:
        assert proxy.version >= (0, 2, 3)
        img = await proxy.open_image(single.ref)
        digest, manifest = await proxy.get_manifest(img)
        assert digest == single.manifest_digest and manifest == single.manifest
        for layer in single.layers:
            assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest
        if proxy.version < (0, 2, 5):
            assert await proxy.get_layer_info(img) is None
        if proxy.version < (0, 2, 8):
            with pytest.raises(ProxyError, match=r"GetRawBlob needs protocol 0\.2\.8; the proxy speaks"):
                await proxy.get_raw_blob(img, single.layers[0].digest)


async def test_capabilities_of_ours_and_of_skopeo(skopeo_proxy_argv):
    """Ours lists its extensions; skopeo's proxy has none and answers the probe with an error reply, which the
    bindings read as 'no extensions' and the connection keeps working."""
    from protocol.extensions import SERVER_EXTENSIONS

    async with ImageProxy.spawn() as proxy:
        assert await proxy.get_capabilities() == frozenset(SERVER_EXTENSIONS)
    async with ImageProxy.spawn(skopeo_proxy_argv) as proxy:
        assert await proxy.get_capabilities() == frozenset()
        with pytest.raises(ProxyError, match="nonexistent"):
            await proxy.open_image("oci:/nonexistent/layout:latest")


async def test_concurrent_calls_from_many_tasks_are_matched_in_order(single):
    """No lock in the client: replies are matched to requests FIFO, whichever task sent them."""
    results: dict[int, bytes] = {}
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(single.ref)

        async def fetch(i: int) -> None:
            layer = single.layers[i % len(single.layers)]
            results[i] = await proxy.get_blob(img, layer.digest, layer.size)

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(fetch, i)
    for i, data in results.items():
        assert sha256(data) == single.layers[i % len(single.layers)].digest
    assert len(results) == 12


async def test_connect_wraps_an_already_connected_socket(single):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = theirs.fileno()
    process = subprocess.Popen([*DEFAULT_ARGV, "--sockfd", str(fd)], pass_fds=[fd], stdin=subprocess.DEVNULL)
    theirs.close()
    try:
        async with ImageProxy.connect(ours) as proxy:
            img = await proxy.open_image(single.ref)
            assert (await proxy.get_manifest(img))[0] == single.manifest_digest
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


async def test_a_server_that_dies_fails_pending_calls(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(
        "import socket, json\n"
        "s = socket.socket(fileno=0)\n"
        "s.recv(32768)\n"
        "s.send(json.dumps({'success': True, 'value': '0.2.8', 'pipeid': 0, 'error_code': '', 'error': ''}).encode())\n"
        "s.recv(32768)\n"
    )
    with pytest.raises(ProxyClosed, match="closed the connection"):
        async with ImageProxy.spawn(["python3", str(script)]) as proxy:
            await proxy.open_image("oci:/whatever")


def test_sync_wrapper(single):
    with SyncImageProxy() as proxy:
        assert proxy.version == "0.2.8"
        img = proxy.open_image(single.ref)
        digest, manifest = proxy.get_manifest(img)
        assert digest == single.manifest_digest and manifest == single.manifest
        layer = single.layers[-1]
        assert sha256(proxy.get_blob(img, layer.digest, layer.size)) == layer.digest
        assert proxy.get_raw_blob(img, layer.digest)[0] == layer.size
        with pytest.raises(ProxyError, match="no image 99"):
            proxy.get_manifest(99)


def test_sync_wrapper_reports_a_server_that_cannot_start():
    with pytest.raises(ProxyError, match="cannot start /nonexistent/image-proxy"):
        SyncImageProxy(["/nonexistent/image-proxy"])


# ------------------------------------------------------------------------------------------- request ids


async def test_ids_are_used_with_ours_and_in_order_matching_with_skopeo(single, skopeo_proxy_argv):
    """Ours offers request-ids, so the bindings use them; skopeo's proxy answers the probe with an error, so the
    bindings fall back to in-order matching, and concurrent calls from many tasks still get their own replies."""
    async with ImageProxy.spawn() as proxy:
        assert proxy.uses_request_ids
    async with ImageProxy.spawn(request_ids=False) as proxy:
        assert not proxy.uses_request_ids
    results: dict[int, bytes] = {}
    async with ImageProxy.spawn(skopeo_proxy_argv) as proxy:
        assert not proxy.uses_request_ids
        img = await proxy.open_image(single.ref)

        async def fetch(i: int) -> None:
            layer = single.layers[i % len(single.layers)]
            results[i] = await proxy.get_blob(img, layer.digest, layer.size)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(fetch, i)
            nursery.start_soon(proxy.get_manifest, img)
    assert len(results) == 8
    for i, data in results.items():
        assert sha256(data) == single.layers[i % len(single.layers)].digest


async def test_calls_with_and_without_ids_interleave_on_one_connection(big, single):
    """A FinishPipe with an id waits for a blob nobody reads; meanwhile calls without an id (in order among
    themselves) and calls with ids are all answered, on the same connection; then the blob is read and the
    waiting FinishPipe answers last."""
    async with ImageProxy.spawn() as proxy:
        assert proxy.uses_request_ids
        img = await proxy.open_image(big.ref)
        layer = big.layers[0]
        reply, (blob_fd,) = await proxy.call("GetBlob", [img, layer.digest, layer.size])
        assert reply.id is not None and reply.value == layer.size
        finished = trio.Event()

        async def finish_blob() -> None:
            await proxy.finish_pipe(reply.pipeid)
            finished.set()

        async def in_order_layer_info(results: list) -> None:
            info, fds = await proxy.call("GetLayerInfo", [img], ordered=True)
            assert info.id is None and fds == []
            results.append(info.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish_blob)
            with trio.fail_after(10):
                ordered: list = []
                other = await proxy.open_image(single.ref)  # with an id
                async with trio.open_nursery() as calls:
                    for _ in range(3):
                        calls.start_soon(in_order_layer_info, ordered)
                    calls.start_soon(proxy.get_manifest, other)  # with ids: GetManifest and its FinishPipe
                closed, _ = await proxy.call("CloseImage", [999], ordered=True)
                assert closed.id is None and closed.error == "no image 999"
                assert (await proxy.get_manifest(img))[0] == big.manifest_digest
            assert ordered == [[layer.info() for layer in big.layers]] * 3
            assert not finished.is_set()  # still waiting for the blob to be read
            received = await proxy._drain(blob_fd, lambda chunk: None)
            with trio.fail_after(10):
                await finished.wait()
        assert received == layer.size


async def test_a_stalled_registry_blob_does_not_delay_get_manifest(registry_images):
    """Between our proxy and the real registry, the fault proxy stalls a blob for good; its FinishPipe (with an
    id) waits. GetManifest and OpenImage on the same connection are answered within a bound meanwhile."""
    from tests.faults.proxy import Stall, fault_proxy

    big = registry_images.images.big
    layer = big.layers[0]
    async with fault_proxy(registry_images.registry.port) as fault:
        rule = fault.add_rule(Stall(at=256 << 10), path=r"/blobs/" + layer.digest)
        ref = f"docker://127.0.0.1:{fault.port}/test/big:latest"
        async with ImageProxy.spawn(extra_args=["--tls-verify=false", "--stall-timeout", "60"]) as proxy:
            assert proxy.uses_request_ids
            img = await proxy.open_image(ref)
            received: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.copy_blob, img, layer.digest, layer.size, lambda c: received.append(len(c)))
                await fault.wait_until(lambda: bool(rule.fired), timeout=30)
                with trio.fail_after(5):
                    digest, manifest = await proxy.get_manifest(img)
                    other = await proxy.open_image(f"docker://127.0.0.1:{fault.port}/test/single:latest")
                    await proxy.close_image(other)
                assert digest == big.manifest_digest and manifest == big.manifest
                assert sum(received) <= 256 << 10  # the blob is still stalled
                nursery.cancel_scope.cancel()


def test_sync_pull_for_scripts(single, tmp_path):
    """``pull_sync`` and ``SyncImageProxy.pull``: every blob of the image, verified, into plain file writers."""
    from protocol.client.pull import pull_sync

    class FileWriter:
        def __init__(self, path):
            self.path, self.file = path, path.with_suffix(".partial").open("wb")

        def write(self, chunk):
            self.file.write(chunk)

        def commit(self):
            self.file.close()
            self.path.with_suffix(".partial").rename(self.path)

        def discard(self):
            self.file.close()

    def sinks(blob):
        return FileWriter(tmp_path / blob.digest.replace(":", "-"))

    image = pull_sync(single.ref, sinks)
    assert image.manifest_digest == single.manifest_digest and image.manifest == single.manifest
    assert image.fetched_bytes == single.config_size + sum(layer.size for layer in single.layers)
    for digest in (single.config_digest, *(layer.digest for layer in single.layers)):
        assert sha256((tmp_path / digest.replace(":", "-")).read_bytes()) == digest
    with SyncImageProxy() as proxy:
        assert proxy.uses_request_ids
        again = proxy.pull(single.ref, lambda blob: None)  # the destination has everything: nothing fetched
        assert again.fetched_bytes == 0 and again.layers == image.layers


@pytest.mark.parametrize("server", ["ours", "skopeo"])
@pytest.mark.parametrize("append", [False, True], ids=["splice", "append-mode-falls-back-to-read-write"])
async def test_copy_blob_into_a_file_moves_every_byte_and_counts_them(
    big, server, append, our_proxy_argv, skopeo_proxy_argv, tmp_path
):
    """copy_blob_into: the blob lands in the file at its offset, unread by Python (splice), or read and written
    where splice cannot write (a file in append mode: EINVAL); the counts reported add up to the size."""
    layer = max(big.layers, key=lambda layer: layer.size)
    assert layer.size > 1 << 20  # more than one pipe's worth, so several moves
    target = tmp_path / "blob"
    target.write_bytes(b"head")
    flags = os.O_WRONLY | (os.O_APPEND if append else 0)
    fd = os.open(target, flags)
    os.lseek(fd, 4, os.SEEK_SET)
    counts: list[int] = []
    try:
        async with ImageProxy.spawn(our_proxy_argv if server == "ours" else skopeo_proxy_argv) as proxy:
            img = await proxy.open_image(big.ref)
            await proxy.copy_blob_into(img, layer.digest, layer.size, fd, counts.append)
    finally:
        os.close(fd)
    data = target.read_bytes()
    assert data[:4] == b"head" and sha256(data[4:]) == layer.digest
    assert sum(counts) == layer.size and all(n > 0 for n in counts)


async def test_copy_blob_into_raises_the_servers_digest_check(single, our_proxy_argv, tmp_path):
    """The client does not hash what it splices: a blob that does not match its digest fails through FinishPipe."""
    layout = tmp_path / "layout"
    shutil.copytree(single.path, layout)
    layer = single.layers[0]
    blob = layout / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        async with ImageProxy.spawn(our_proxy_argv) as proxy:
            img = await proxy.open_image(f"oci:{layout}:{single.tag}")
            with pytest.raises(ProxyError, match=layer.digest):
                await proxy.copy_blob_into(img, layer.digest, layer.size, fd, lambda n: None)
    finally:
        os.close(fd)
