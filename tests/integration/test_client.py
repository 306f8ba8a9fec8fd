"""The client bindings against both servers: ours, and the real skopeo proxy (0.2.3 in Debian)."""

from __future__ import annotations

import hashlib
import socket
import subprocess

import pytest
import trio

from protocol.client import DEFAULT_ARGV, ImageProxy, ProxyClosed
from protocol.errors import ProxyError
from protocol.sync_client import SyncImageProxy


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
