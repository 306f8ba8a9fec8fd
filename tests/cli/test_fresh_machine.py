"""README's first command on a machine that has nothing but Python: run in a private mount namespace where
``/etc/containers`` and ``/usr/share/containers`` are empty, ``$HOME`` is an empty directory and skopeo cannot run.

The command is read from README.md itself (the line after ``./setup.sh && ``; the venv already exists here), so
the README cannot drift from what is tested.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_COMMAND = re.compile(r"^    \./setup\.sh && (\.venv/bin/image-proxy .*)$", re.MULTILINE)
#: where containers-common puts policy.json, registries.conf, registries.d, ...
CONTAINERS_DIRS = ("/etc/containers", "/usr/share/containers")


def readme_first_command() -> str:
    found = README_COMMAND.findall((REPO / "README.md").read_text())
    assert len(found) == 1, f"README.md should have exactly one './setup.sh && .venv/bin/image-proxy ...' line: {found}"
    return found[0]


def run_fresh(command: str, home: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """``command`` (a shell line) from the repository root in a mount namespace that looks like a fresh machine."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is needed to make a private mount namespace; install util-linux")
    hide = [f"[ ! -d {d} ] || mount -t tmpfs fresh {d}" for d in CONTAINERS_DIRS]
    skopeo = shutil.which("skopeo")
    if skopeo:  # an empty file over the binary: it cannot run, as on a machine without it
        hide.append(f"mount --bind /dev/null {shlex.quote(skopeo)}")
    script = "\n".join(["set -e", *hide, f"cd {shlex.quote(str(REPO))}", "set +e", command])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmpdir), "LANG": "C.UTF-8"}
    done = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "bash", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if "unshare:" in done.stderr or "mount:" in done.stderr:
        pytest.fail(f"could not make the fresh-machine namespace (run as root): {done.stderr}")
    return done


@pytest.fixture
def fresh(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    return home, tmpdir


def test_readme_first_command_works_on_a_fresh_machine(fresh):
    home, tmpdir = fresh
    done = run_fresh(readme_first_command(), home, tmpdir)
    assert done.returncode == 0, f"README's first command failed on a fresh machine:\n{done.stdout}{done.stderr}"
    made = list(tmpdir.iterdir())
    assert len(made) == 1, f"expected one fresh directory under $TMPDIR, found {made}"
    layout = made[0] / "hello"
    assert f"to oci:{layout}:latest" in done.stdout, done.stdout
    index = json.loads((layout / "index.json").read_text())
    (manifest,) = index["manifests"]
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    blobs = list((layout / "blobs" / "sha256").iterdir())
    assert len(blobs) == 4  # manifest, config, two layers
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_without_a_policy_the_error_says_where_it_looked_and_what_to_do(fresh):
    home, tmpdir = fresh
    command = readme_first_command().replace(" --policy examples/policy.json", "")
    assert "--policy" not in command
    done = run_fresh(command, home, tmpdir)
    assert done.returncode != 0, done.stdout
    assert (
        f'no policy.json file found at any of the following: "{home}/.config/containers/policy.json", '
        '"/etc/containers/policy.json"'
    ) in done.stderr
    assert "pass --policy FILE" in done.stderr
    # nothing was accepted: no blob was written
    assert not list(tmpdir.rglob("sha256/*"))


def test_the_example_policy_accepts_only_local_layouts():
    policy = json.loads((REPO / "examples" / "policy.json").read_text())
    assert policy["default"] == [{"type": "reject"}]
    assert policy["transports"] == {"oci": {"": [{"type": "insecureAcceptAnything"}]}}
