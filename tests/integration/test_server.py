"""Our server over a real socketpair, driven by the client bindings: every method, every error.

The server is the real process (``python -m proxy experimental-image-proxy``); images are OCI layouts
built by tests/support/images.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import trio

from protocol.client import DEFAULT_ARGV, ImageProxy
from protocol.codec import encode_request
from protocol.errors import ErrorCode, ProxyError
from protocol.messages import Request

#: the process must be gone this long after Shutdown or EOF (target 1 s; slack for a loaded CI machine)
EXIT_BOUND = 2.0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def read_fd(fd: int) -> bytes:
    parts = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


# --------------------------------------------------------------------------- all methods


async def test_initialize_reports_0_2_8():
    async with ImageProxy.spawn() as proxy:
        assert proxy.version_text == "0.2.8"


async def test_every_method_on_a_single_arch_image(single):
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(single.ref)
        assert img == 1
        digest, manifest = await proxy.get_manifest(img)
        assert digest == single.manifest_digest
        assert sha256(manifest) == single.manifest_digest
        doc = json.loads(manifest)
        assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"

        full = json.loads(await proxy.get_full_config(img))
        assert full["rootfs"]["diff_ids"] and full["os"] == "linux"
        runtime = json.loads(await proxy.get_config(img))
        assert runtime == full["config"]

        infos = await proxy.get_layer_info(img)  # piped, since the server is 0.2.8
        assert [(i["digest"], i["size"]) for i in infos] == [(layer.digest, layer.size) for layer in single.layers]
        inline, _ = await proxy.call("GetLayerInfo", [img])
        assert inline.success and inline.value == infos

        for layer in single.layers:
            data = await proxy.get_blob(img, layer.digest, layer.size)
            assert sha256(data) == layer.digest and len(data) == layer.size
            size, raw = await proxy.get_raw_blob(img, layer.digest)
            assert size == layer.size and raw == data
        config = await proxy.get_blob(img, single.config_digest, single.config_size)
        assert sha256(config) == single.config_digest

        second = await proxy.open_image(single.ref)
        assert second == 2, "image ids increase and are never reused"
        await proxy.close_image(img)
        with pytest.raises(ProxyError, match=f"no image {img}"):
            await proxy.get_manifest(img)
        with pytest.raises(ProxyError, match="no image 1"):
            await proxy.close_image(img)


async def test_open_image_optional(single):
    async with ImageProxy.spawn() as proxy:
        assert await proxy.open_image_optional(single.ref) == 1
        missing = single.ref.rsplit(":", 1)[0] + ":no-such-tag"
        assert await proxy.open_image_optional(missing) is None
        with pytest.raises(ProxyError, match="no-such-tag"):
            await proxy.open_image(missing)


async def test_multi_arch_index_resolves_to_the_override_platform(multi):
    for arch in ("amd64", "arm64"):
        async with ImageProxy.spawn(extra_args=["--override-arch", arch, "--override-os", "linux"]) as proxy:
            img = await proxy.open_image(multi.ref)
            digest, _manifest = await proxy.get_manifest(img)
            assert digest == multi.instances[arch].manifest_digest
            assert json.loads(await proxy.get_full_config(img))["architecture"] == arch


async def test_no_matching_platform_names_it(multi):
    async with ImageProxy.spawn(extra_args=["--override-arch", "mips64le"]) as proxy:
        with pytest.raises(ProxyError, match='no image found in image index for architecture "mips64le"'):
            await proxy.open_image(multi.ref)


async def test_docker_schema2_is_converted_to_oci(v2s2):
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(v2s2.ref)
        digest, manifest = await proxy.get_manifest(img)
        assert digest == v2s2.manifest_digest, "the digest is that of the original schema2 manifest"
        doc = json.loads(manifest)
        assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert doc["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        assert [entry["digest"] for entry in doc["layers"]] == [layer.digest for layer in v2s2.layers]
        infos = await proxy.get_layer_info(img)
        assert {i["media_type"] for i in infos} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
        # The converted manifest names the re-serialized OCI config; skopeo cannot serve it, we do.
        full = await proxy.get_full_config(img)
        assert doc["config"]["digest"] == sha256(full) != v2s2.config_digest
        assert await proxy.get_blob(img, doc["config"]["digest"], doc["config"]["size"]) == full
        assert (await proxy.get_raw_blob(img, doc["config"]["digest"]))[1] == full
        # and the original config is still there under its own digest
        assert await proxy.get_blob(img, v2s2.config_digest, v2s2.config_size) == v2s2.config


# --------------------------------------------------------------------------- verification


async def test_wrong_size_is_reported_by_finish_pipe(single):
    layer = single.layers[0]
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(single.ref)
        with pytest.raises(ProxyError, match=f"expected {layer.size + 1} bytes in blob, got {layer.size}"):
            await proxy.get_blob(img, layer.digest, layer.size + 1)
        # the session goes on
        assert len(await proxy.get_blob(img, layer.digest, layer.size)) == layer.size


@pytest.fixture
def corrupted(single, tmp_path):
    """A copy of the single-arch layout whose first layer file has one byte flipped."""
    root = tmp_path / "corrupt"
    shutil.copytree(single.path, root)
    layer = single.layers[0]
    blob = root / "blobs" / "sha256" / layer.digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return f"oci:{root}:{single.tag}", layer


async def test_corrupted_blob_is_reported_by_finish_pipe_and_raw_error_fd(corrupted):
    ref, layer = corrupted
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(ref)
        with pytest.raises(ProxyError, match=f"corrupted blob, expecting {layer.digest}") as info:
            await proxy.get_blob(img, layer.digest, layer.size)
        assert info.value.code is ErrorCode.OTHER
        with pytest.raises(ProxyError, match=f"corrupted blob, expecting {layer.digest}"):
            await proxy.get_raw_blob(img, layer.digest)


async def test_unknown_blob_is_an_immediate_error(single):
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(single.ref)
        reply, fds = await proxy.call("GetBlob", [img, "sha256:" + "0" * 64, 10])
        assert not reply.success and fds == []
        assert "sha256:" + "0" * 64 in reply.error


# --------------------------------------------------------------------------- pipes


async def test_pipe_ids_are_nonzero_and_unique_while_open(single):
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(single.ref)
        replies = [await proxy.call("GetManifest", [img]) for _ in range(5)]
        ids = [reply.pipeid for reply, _ in replies]
        assert all(ids) and len(set(ids)) == 5
        for reply, (fd,) in replies:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_fd, fd)
                await proxy.finish_pipe(reply.pipeid)
        with pytest.raises(ProxyError, match=f"finishpipe: no active pipe {ids[0]}"):
            await proxy.finish_pipe(ids[0])


async def test_client_closing_the_pipe_early_gives_epipe(big):
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(big.ref)
        layer = big.layers[0]
        reply, (fd,) = await proxy.call("GetBlob", [img, layer.digest, layer.size])
        assert reply.success and reply.value == layer.size
        assert len(os.read(fd, 4096)) > 0
        os.close(fd)
        finish, _ = await proxy.call("FinishPipe", [reply.pipeid])
        assert not finish.success
        assert finish.error == "write |1: broken pipe" and finish.error_code is ErrorCode.EPIPE
        # still serving
        digest, _ = await proxy.get_manifest(img)
        assert digest == big.manifest_digest


async def test_raw_blob_early_close_reports_epipe_on_the_error_fd(big):
    async with ImageProxy.spawn() as proxy:
        img = await proxy.open_image(big.ref)
        layer = big.layers[0]
        reply, (data_fd, err_fd) = await proxy.call("GetRawBlob", [img, layer.digest])
        assert reply.success and reply.pipeid == 0
        os.close(data_fd)
        err = json.loads(await read_fd(err_fd))
        assert err == {"code": "EPIPE", "message": "write |1: broken pipe"}


# --------------------------------------------------------------------------- ending a session


def spawn_raw(*extra: str) -> tuple[socket.socket, subprocess.Popen]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen([*DEFAULT_ARGV, *extra], stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(30)
    return ours, process


def raw_call(sock: socket.socket, data: bytes) -> tuple[dict, list[int]]:
    sock.send(data)
    msg, fds, flags, _ = socket.recv_fds(sock, 32768, 4)
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    return json.loads(msg), fds


def call(sock: socket.socket, method: str, *args) -> tuple[dict, list[int]]:
    return raw_call(sock, encode_request(Request(method, list(args))))


@pytest.fixture
def blocked_transfer(big):
    """A server whose GetBlob producer is blocked (nobody reads) and whose FinishPipe is waiting."""
    sock, process = spawn_raw()
    try:
        assert call(sock, "Initialize")[0]["value"] == "0.2.8"
        img = call(sock, "OpenImage", big.ref)[0]["value"]
        layer = big.layers[0]
        reply, fds = call(sock, "GetBlob", img, layer.digest, layer.size)
        assert reply["success"] and len(fds) == 1
        sock.send(encode_request(Request("FinishPipe", [reply["pipeid"]])))
        yield sock, process, fds[0]
    finally:
        process.kill()
        process.wait()
        sock.close()


def test_shutdown_ends_a_blocked_transfer_at_once(blocked_transfer):
    sock, process, fd = blocked_transfer
    sock.send(encode_request(Request("Shutdown", [])))
    assert process.wait(timeout=EXIT_BOUND) == 0
    os.close(fd)


def test_socket_eof_ends_a_blocked_transfer_at_once(blocked_transfer):
    sock, process, fd = blocked_transfer
    sock.shutdown(socket.SHUT_RDWR)
    assert process.wait(timeout=EXIT_BOUND) == 0
    os.close(fd)


def test_client_killed_mid_transfer(big, tmp_path):
    """A client process killed while reading a blob: the server notices EOF and exits 0."""
    script = tmp_path / "client.py"
    script.write_text(
        "import os, socket, sys, json\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "def call(m, *a):\n"
        "    s.send(json.dumps({'method': m, 'args': list(a)}).encode())\n"
        "    msg, fds, _, _ = socket.recv_fds(s, 32768, 2)\n"
        "    return json.loads(msg), fds\n"
        "call('Initialize')\n"
        f"img = call('OpenImage', {big.ref!r})[0]['value']\n"
        f"r, fds = call('GetBlob', img, {big.layers[0].digest!r}, {big.layers[0].size})\n"
        "os.read(fds[0], 1000)\n"
        "print('reading', flush=True)\n"
        "sys.stdin.read()\n"
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([*DEFAULT_ARGV], stdin=theirs, stdout=subprocess.DEVNULL)
    client = subprocess.Popen(
        [sys.executable, str(script), str(ours.fileno())],
        pass_fds=[ours.fileno()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    ours.close()
    theirs.close()
    try:
        assert client.stdout.readline() == b"reading\n"
        client.kill()
        client.wait()
        assert server.wait(timeout=EXIT_BOUND) == 0
    finally:
        server.kill()
        client.kill()
        server.wait()
        client.wait()


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def raw_session():
    sock, process = spawn_raw()
    yield sock, process
    sock.close()
    process.wait(timeout=EXIT_BOUND)


def test_bad_input_gets_error_replies_and_the_server_keeps_serving(raw_session, single):
    sock, process = raw_session
    before = call(sock, "OpenImage", single.ref)[0]
    assert before["error"] == "client error: must invoke Initialize"
    assert call(sock, "Initialize")[0]["success"]
    cases = [
        (b"{not json", "invalid request: malformed JSON"),
        (b"\xff\xfe", "invalid request: not UTF-8"),
        (b"[]", "invalid request: expected a JSON object"),
        (b'{"method":"GetManifest","args":"1"}', '"args" must be an array'),
        (b'{"method":"Initialize","args":[]}', "already initialized"),
        (b'{"method":"Nope","args":[]}', "unknown method: Nope"),
        (b'{"method":"GetManifest","args":[]}', "invalid request, expecting one argument (imgid), found 0"),
        (b'{"method":"GetManifest","args":["1"]}', "expecting numeric, not string"),
        (b'{"method":"GetManifest","args":[0]}', "invalid imageid value of zero"),
        (b'{"method":"GetManifest","args":[42]}', "no image 42"),
        (b'{"method":"GetManifest","args":[9007199254740992]}', "out of range integer"),
        (b'{"method":"FinishPipe","args":[]}', "invalid request, expecting one argument (pipeid), found 0"),
        (b'{"method":"FinishPipe","args":[77]}', "finishpipe: no active pipe 77"),
        (b'{"method":"GetBlob","args":[1,"sha256:zz",1]}', "invalid checksum digest format"),
        (b'{"method":"OpenImage","args":["nosuchtransport:foo"]}', "nosuchtransport"),
        (b'{"method":"OpenImage","args":["containers-storage:foo"]}', "containers-storage"),
        (b'{"method":"OpenImage","args":["oci:/nonexistent/dir:tag"]}', "/nonexistent/dir"),
        (b'{"method":"OpenImage","args":[' + b'"' + b"x" * 40000 + b'"]}', "32768 byte packet limit"),
    ]
    for packet, expected in cases:
        reply, fds = raw_call(sock, packet)
        assert fds == []
        assert list(reply) == ["success", "value", "pipeid", "error_code", "error"]
        assert reply["success"] is False and reply["error_code"] == "other", packet
        assert expected in reply["error"], (packet, reply)
    img = call(sock, "OpenImage", single.ref)[0]
    assert img["success"] and img["value"] == 1
    assert process.poll() is None
