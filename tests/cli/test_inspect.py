"""``image-proxy inspect`` and ``layers`` against the real registry; errors a person can act on; --proxy-socket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.cli.helpers import INSECURE, image_proxy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = f"oci:{ROOT / 'examples/hello'}:latest"


def test_inspect_and_layers_of_a_registry_image(registry_images):
    single = registry_images.images.single
    ref = registry_images.ref("test/single")
    text = image_proxy("inspect", INSECURE, ref)
    assert text.returncode == 0, text.stderr
    assert f"Digest:      {single.manifest_digest}\n" in text.stdout
    assert f"Config:      {single.config_digest}\n" in text.stdout and "Platform:    linux/amd64\n" in text.stdout
    for layer in single.layers:
        assert layer.digest in text.stdout

    doc = json.loads(image_proxy("inspect", "--json", INSECURE, ref).stdout)
    assert doc["digest"] == single.manifest_digest and doc["config"] == single.config_json
    assert [layer["digest"] for layer in doc["layers"]] == [layer.digest for layer in single.layers]
    raw = subprocess.run(
        [sys.executable, "-m", "proxy", "inspect", "--raw", INSECURE, ref], capture_output=True, timeout=120
    )
    assert raw.returncode == 0 and raw.stdout == single.manifest

    layers = json.loads(image_proxy("layers", "--json", INSECURE, ref).stdout)
    assert [(x["digest"], x["size"], x["diffID"]) for x in layers] == [
        (layer.digest, layer.size, layer.diff_id) for layer in single.layers
    ]
    lines = image_proxy("layers", INSECURE, ref).stdout.splitlines()
    assert len(lines) == len(single.layers)
    assert lines[0].startswith(f"1  {single.layers[0].digest}")
    assert lines[0].endswith(layers[0]["createdBy"])


def test_a_plain_http_registry_without_tls_verify_false_says_what_to_try(registry_images):
    result = image_proxy("inspect", registry_images.ref("test/single"))
    assert result.returncode == 1
    assert result.stderr.startswith("image-proxy inspect: ")
    assert registry_images.registry.authority in result.stderr and "--tls-verify=false" in result.stderr


def test_a_missing_tag_names_the_image_and_a_hint(registry_images, tmp_path):
    ref = registry_images.ref("test/single", "no-such-tag")
    result = image_proxy("copy", INSECURE, ref, f"oci:{tmp_path / 'o'}")
    assert result.returncode == 1
    assert ref.removeprefix("docker://") in result.stderr
    assert "hint: check the repository name and the tag or digest" in result.stderr


def test_registry_flags_with_proxy_socket_are_refused(tmp_path):
    result = image_proxy("copy", "--proxy-socket", str(tmp_path / "s"), INSECURE, EXAMPLE, f"oci:{tmp_path / 'o'}")
    assert result.returncode == 2 and "--tls-verify" in result.stderr and "daemon's own settings" in result.stderr
    gone = image_proxy("inspect", "--proxy-socket", str(tmp_path / "nobody-listens"), EXAMPLE)
    assert gone.returncode == 1
    assert f"cannot connect to the image proxy at {tmp_path / 'nobody-listens'}" in gone.stderr
    assert "hint: is the daemon running?" in gone.stderr


def test_proxy_socket_uses_the_server_listening_there(tmp_path):
    """A listening SOCK_SEQPACKET socket whose one connection is served by our proxy (--sockfd): the command
    connects there instead of starting a proxy of its own."""
    path = tmp_path / "proxy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(60)
    served: list[int] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            fd = conn.fileno()
            done = subprocess.run(
                [sys.executable, "-m", "proxy", "experimental-image-proxy", "--sockfd", str(fd)],
                pass_fds=[fd],
                stdin=subprocess.DEVNULL,
                timeout=120,
            )
            served.append(done.returncode)

    thread = threading.Thread(target=serve_one)
    thread.start()
    try:
        result = image_proxy("layers", "--proxy-socket", str(path), EXAMPLE)
    finally:
        thread.join(timeout=120)
        listener.close()
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2 and "COPY hello.txt /" in result.stdout
    assert served == [0]
