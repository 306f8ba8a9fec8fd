"""``image-proxy inspect`` and ``layers`` against the real registry; errors a person can act on; --proxy-socket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.cli.helpers import INSECURE, image_proxy, skopeo_run
from tests.support.images import ARM64, S390X, platform_flags

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = f"oci:{ROOT / 'examples/hello'}:latest"
#: no instance of the test index is for this platform
RISCV64 = platform_flags("riscv64")


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
    assert [(x["digest"], x["size"], x["diff_id"]) for x in layers] == [
        (layer.digest, layer.size, layer.diff_id) for layer in single.layers
    ]
    lines = image_proxy("layers", INSECURE, ref).stdout.splitlines()
    assert len(lines) == len(single.layers)
    assert lines[0].startswith(f"1  {single.layers[0].digest}")
    assert lines[0].endswith(layers[0]["created_by"])


def test_a_multi_platform_image_shows_its_index_and_platforms(registry_images, skopeo):
    """An index pushed with ``skopeo copy --all``: the index digest (the one to pin the tag by) and one line per
    platform with its digest; the instance shown below is the one for --override-arch."""
    multi = registry_images.multi
    ref = registry_images.ref("test/multi")
    index = json.loads(skopeo_run(skopeo, "inspect", "--raw", INSECURE, ref))
    result = image_proxy("inspect", INSECURE, *ARM64, ref)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == f"Index:       {multi.digest} (3 manifests, application/vnd.oci.image.index.v1+json)"
    arm64 = multi.instances["arm64"].manifest_digest
    keys = ("os", "architecture", "variant")
    expected = [
        ("/".join(e["platform"][k] for k in keys if k in e["platform"]), e["digest"]) for e in index["manifests"]
    ]
    for (platform, digest), line in zip(expected, lines[2:5], strict=True):
        assert line.split()[:2] == [platform, digest]
        assert line.endswith("(shown below)") == (digest == arm64)
    assert lines[5] == f"Digest:      {arm64}"
    assert "Platform:    linux/arm64/v8" in lines


def test_inspect_json_carries_both_digests(registry_images, skopeo):
    multi = registry_images.multi
    ref = registry_images.ref("test/multi")
    index = json.loads(skopeo_run(skopeo, "inspect", "--raw", INSECURE, ref))
    doc = json.loads(image_proxy("inspect", "--json", INSECURE, *S390X, ref).stdout)
    assert doc["index_digest"] == multi.digest and doc["digest"] == multi.instances["s390x"].manifest_digest
    assert doc["index_media_type"] == index["mediaType"]
    assert [(p["digest"], p["size"], p["media_type"]) for p in doc["platforms"]] == [
        (e["digest"], e["size"], e["mediaType"]) for e in index["manifests"]
    ]
    assert [p["platform"] for p in doc["platforms"]] == ["linux/amd64", "linux/arm64/v8", "linux/s390x"]
    single = json.loads(image_proxy("inspect", "--json", INSECURE, registry_images.ref("test/single")).stdout)
    assert single["index_digest"] is None and single["platforms"] == []
    assert single["digest"] == registry_images.single.manifest_digest


def test_inspect_raw_is_what_skopeo_inspect_raw_prints(registry_images, skopeo):
    """The index when there is one, also for a platform it does not offer; a schema2 image as stored (not the OCI
    manifest the proxy converts it to)."""
    for repository, flags in (("test/multi", ()), ("test/multi", RISCV64), ("test/v2s2", ())):
        ref = registry_images.ref(repository)
        expected = subprocess.run(
            [skopeo, "inspect", "--raw", INSECURE, ref], capture_output=True, timeout=120, check=True
        ).stdout
        raw = subprocess.run(
            [sys.executable, "-m", "proxy", "inspect", "--raw", INSECURE, *flags, ref], capture_output=True, timeout=120
        )
        assert raw.returncode == 0, raw.stderr
        assert raw.stdout == expected, repository


def test_no_instance_for_this_platform_names_the_platforms_offered(registry_images):
    result = image_proxy("inspect", INSECURE, *RISCV64, registry_images.ref("test/multi"))
    assert result.returncode == 1
    assert "no image found in image index for architecture" in result.stderr
    assert f"the index {registry_images.multi.digest} offers linux/amd64, linux/arm64/v8, linux/s390x" in result.stderr


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
