"""A fake machine for the configuration readers (conftest.py's ``host`` fixture): HOME, XDG_RUNTIME_DIR, a root for
/etc and /run, and a PATH that holds only the fake credential helpers (never the real /etc, $HOME or helpers)."""

from __future__ import annotations

import base64
import json
import stat
import sys
from pathlib import Path

import attrs


@attrs.frozen
class FakeHost:
    base: Path
    home: Path
    runtime: Path
    root: Path
    bin: Path
    environ: dict[str, str]

    def write(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def etc(self, relative: str) -> Path:
        return self.root / "etc" / relative

    def write_json(self, path: Path, document: object) -> Path:
        return self.write(path, json.dumps(document))

    def helper(self, name: str, script: str) -> Path:
        """``docker-credential-<name>``: a Python script whose body sees ``action`` and ``server``."""
        path = self.bin / f"docker-credential-{name}"
        body = "\n".join(
            [
                f"#!{sys.executable}",
                "import json, sys, time",
                "action = sys.argv[1]",
                "server = sys.stdin.read()",
                script,
            ]
        )
        path.write_text(body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return path


def make_host(tmp_path: Path) -> FakeHost:
    home = tmp_path / "home"
    runtime = tmp_path / "run-user"
    root = tmp_path / "root"
    bin_dir = tmp_path / "bin"
    for d in (home, runtime, root, bin_dir):
        d.mkdir()
    environ = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime), "PATH": str(bin_dir)}
    return FakeHost(tmp_path, home, runtime, root, bin_dir, environ)


def auth(username: str, password: str) -> str:
    """An ``auths`` entry's ``auth`` value."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()
