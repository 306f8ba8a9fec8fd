"""In daemon mode a client reads only what it could read itself (issue 14, parts 3 and 4).

A root daemon serves clients that run as other users (children started with ``setpriv``): local layouts are
opened with the client's filesystem identity, so the kernel denies what the shell would deny and allows what
it would allow, groups included. And the signature policy judges the path the kernel opened, not the
reference's text: ``oci:$B/S/../trusted/img`` with ``S`` a symlink is matched where it leads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import ImageSpec, LayerSpec, build_oci_layout

NOBODY = 65534
#: a group nobody is not in by default; the client gets it as a supplementary group where a test says so
GROUP = 4242

#: the client: one connection, Initialize, OpenImage, GetBlob of the first layer (read exactly, then FinishPipe);
#: prints one JSON line per reply (fds are not printed)
CLIENT = r"""
import array, json, os, socket, sys
path, ref, digest, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(20)
s.connect(path)
def call(method, *args):
    s.send(json.dumps({"method": method, "args": list(args)}).encode())
    data, anc, _, _ = s.recvmsg(32768, socket.CMSG_SPACE(8))
    fds = array.array("i")
    for _, _, p in anc:
        fds.frombytes(p[: len(p) - len(p) % 4])
    reply = json.loads(data)
    print(json.dumps({"method": method, "success": reply["success"], "error": reply["error"]}), flush=True)
    return reply, list(fds)
call("Initialize")
reply, _ = call("OpenImage", ref)
if reply["success"]:
    image = reply["value"]
    reply, fds = call("GetBlob", image, digest, size)
    if reply["success"]:
        got = b""
        while len(got) < size:
            chunk = os.read(fds[0], size - len(got))
            if not chunk:
                break
            got += chunk
        print(json.dumps({"read": len(got)}), flush=True)
        call("FinishPipe", reply["pipeid"])
"""


def _public_dir() -> Path:
    """A directory everyone can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="image-proxy-access-"))
    path.chmod(0o755)
    return path


@pytest.fixture
def public() -> Iterator[Path]:
    path = _public_dir()
    yield path
    shutil.rmtree(path)


def _layout(root: Path, tag: str = "img"):
    spec = ImageSpec(layers=(LayerSpec({"hello.txt": b"hello " + tag.encode()}),))
    return build_oci_layout(root, {tag: spec}).images[tag]


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for path, _subdirs, names in os.walk(root):
        os.chmod(path, dirs)
        for name in names:
            os.chmod(os.path.join(path, name), files)


def _as_user(socket_path: Path, ref: str, image, groups: tuple[int, ...] = ()) -> list[dict]:
    layer = image.layers[0]
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}"]
    argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    argv += [sys.executable, "-c", CLIENT, str(socket_path), ref, layer.digest, str(layer.size)]
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run clients as other users", pytrace=False)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _opened(lines: list[dict]) -> dict:
    return next(line for line in lines if line.get("method") == "OpenImage")


async def test_a_client_cannot_read_a_layout_it_could_not_read_itself(start_daemon, public: Path) -> None:
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--socket-mode", "0666")
    private = public / "private"
    private.mkdir(mode=0o700)
    image = _layout(private / "layout")
    _chmod_tree(private / "layout", 0o755, 0o644)  # readable inside, but the 0700 parent stops others
    private.chmod(0o700)
    lines = _as_user(daemon.socket_path, f"oci:{private / 'layout'}:img", image)
    opened = _opened(lines)
    assert not opened["success"]
    assert "permission denied" in opened["error"].lower() and str(private / "layout") in opened["error"]
    # the same for root, which may: the daemon itself is not the limit
    assert os.access(private / "layout" / "index.json", os.R_OK)


async def test_a_client_reads_what_it_may(start_daemon, public: Path) -> None:
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--socket-mode", "0666")
    image = _layout(public / "layout")
    _chmod_tree(public / "layout", 0o755, 0o644)
    lines = _as_user(daemon.socket_path, f"oci:{public / 'layout'}:img", image)
    assert _opened(lines)["success"], lines
    assert {"read": image.layers[0].size} in lines
    assert lines[-1] == {"method": "FinishPipe", "success": True, "error": ""}


async def test_group_permissions_count_as_the_shell_would(start_daemon, public: Path) -> None:
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--socket-mode", "0666")
    shared = public / "shared"
    image = _layout(shared / "layout")
    _chmod_tree(shared, 0o750, 0o640)
    os.chown(shared, 0, GROUP)
    for path, _, names in os.walk(shared):
        os.chown(path, 0, GROUP)
        for name in names:
            os.chown(os.path.join(path, name), 0, GROUP)
    ref = f"oci:{shared / 'layout'}:img"
    outsider = _opened(_as_user(daemon.socket_path, ref, image))
    assert not outsider["success"] and "permission denied" in outsider["error"].lower()
    member = _as_user(daemon.socket_path, ref, image, groups=(GROUP,))
    assert _opened(member)["success"], member
    assert {"read": image.layers[0].size} in member


async def test_a_blob_the_client_may_not_read_is_refused(start_daemon, public: Path) -> None:
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--socket-mode", "0666")
    image = _layout(public / "layout")
    _chmod_tree(public / "layout", 0o755, 0o644)
    layer = image.layers[0]
    blob = public / "layout" / "blobs" / "sha256" / layer.digest.split(":")[1]
    blob.chmod(0o600)
    lines = _as_user(daemon.socket_path, f"oci:{public / 'layout'}:img", image)
    assert _opened(lines)["success"]
    blob_reply = next(line for line in lines if line.get("method") == "GetBlob")
    assert not blob_reply["success"] and "permission denied" in blob_reply["error"].lower()


async def test_the_policy_judges_the_path_the_kernel_opened(start_daemon, public: Path) -> None:
    # $B/trusted/img is accepted by the policy, everything else rejected. $B/S is a symlink to an attacker's
    # directory beside which the attacker put a layout named trusted/img: the text $B/S/../trusted/img reads
    # as $B/trusted/img, the kernel opens the attacker's.
    base = public / "B"
    (base / "trusted").mkdir(parents=True)
    genuine = _layout(base / "trusted" / "img", "genuine")
    attacker = public / "evil"
    (attacker / "sub").mkdir(parents=True)
    forged = _layout(attacker / "trusted" / "img", "forged")
    (base / "S").symlink_to(attacker / "sub")
    policy = public / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "default": [{"type": "reject"}],
                "transports": {"oci": {str(base / "trusted"): [{"type": "insecureAcceptAnything"}]}},
            }
        )
    )
    daemon = await start_daemon("--policy", str(policy), "--no-blob-cache", "--socket-mode", "0666")
    tricked = _opened(_as_user(daemon.socket_path, f"oci:{base}/S/../trusted/img:forged", forged))
    assert not tricked["success"]
    assert "rejected by signature policy" in tricked["error"] and str(attacker / "trusted" / "img") in tricked["error"]
    honest = _as_user(daemon.socket_path, f"oci:{base / 'trusted' / 'img'}:genuine", genuine)
    assert _opened(honest)["success"], honest
