"""Fixtures for the signature policy tests: throwaway GPG keys, images signed by the real skopeo (in ``dir:``
and in a real docker-registry with a lookaside directory), sigstore signatures made with ``cryptography``,
and a loopback HTTP server for lookaside over HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import attrs
import pytest

from tests.http.registry import Registry
from tests.support.images import StandardImages, require_skopeo

GPG_HINT = "gpg and gpgv are required for the signature tests: apt-get install gpg gpg-agent gpgv"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(GPG_HINT, pytrace=False)
    return path


@attrs.frozen
class GpgKey:
    fingerprint: str
    armored: Path  # the public key, ASCII-armored
    binary: Path  # the public key, binary


@attrs.frozen
class Gpg:
    home: Path
    trusted: GpgKey
    other: GpgKey  # a key the policies do not trust

    def env(self) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.home)}


def _new_key(home: Path, name: str, out: Path) -> GpgKey:
    gpg = _require("gpg")
    env = {**os.environ, "GNUPGHOME": str(home)}
    uid = f"{name} <{name}@example.invalid>"
    subprocess.run(
        [gpg, "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    listing = subprocess.run(
        [gpg, "--batch", "--with-colons", "--list-keys", uid], env=env, check=True, capture_output=True, text=True
    ).stdout
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    armored, binary = out / f"{name}.asc", out / f"{name}.gpg"
    armored.write_bytes(
        subprocess.run(
            [gpg, "--batch", "--armor", "--export", fingerprint], env=env, check=True, capture_output=True
        ).stdout
    )
    binary.write_bytes(
        subprocess.run([gpg, "--batch", "--export", fingerprint], env=env, check=True, capture_output=True).stdout
    )
    return GpgKey(fingerprint, armored, binary)


@pytest.fixture(scope="session")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpg]:
    _require("gpgv")
    root = tmp_path_factory.mktemp("gpg")
    home = root / "home"
    home.mkdir(mode=0o700)
    keys = root / "keys"
    keys.mkdir()
    try:
        yield Gpg(home, _new_key(home, "trusted", keys), _new_key(home, "other", keys))
    finally:
        gpgconf = shutil.which("gpgconf")
        if gpgconf:  # stop the gpg-agent this home started
            subprocess.run([gpgconf, "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, check=False)


def skopeo_copy_signed(
    gpg: Gpg,
    source: str,
    destination: str,
    key: GpgKey | None,
    copy_flags: list[str] | None = None,
    global_flags: list[str] | None = None,
) -> None:
    """The real ``skopeo copy`` under the throwaway GNUPGHOME, signing with ``key`` unless None."""
    argv = [require_skopeo(), "--insecure-policy", *(global_flags or []), "copy", "--quiet", *(copy_flags or [])]
    if key is not None:
        argv += ["--sign-by", key.fingerprint]
    argv += [source, destination]
    result = subprocess.run(argv, env=gpg.env(), capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


@attrs.frozen
class DirImages:
    """``single`` copied to dir: layouts by skopeo, signed under the identity ``DIR_IDENTITY``."""

    signed: Path
    unsigned: Path
    wrong_key: Path
    tampered: Path  # signed, then manifest.json changed


DIR_IDENTITY = "registry.example/test/signed:1"


@pytest.fixture(scope="session")
def dir_images(built: StandardImages, gpg: Gpg, tmp_path_factory: pytest.TempPathFactory) -> DirImages:
    root = tmp_path_factory.mktemp("signed-dirs")
    source = f"oci:{built.layout.path}:latest"
    paths = {name: root / name for name in ("signed", "unsigned", "wrong_key", "tampered")}
    keys = {"signed": gpg.trusted, "unsigned": None, "wrong_key": gpg.other, "tampered": gpg.trusted}
    for name, key in keys.items():
        flags = ["--sign-identity", DIR_IDENTITY] if key is not None else []
        skopeo_copy_signed(gpg, source, f"dir:{paths[name]}", key, flags)
    manifest = paths["tampered"] / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b"\n")  # other bytes, so another digest than the signed one
    return DirImages(**paths)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if "/broken/" in self.path:  # a lookaside server failing
            self.send_error(500, "lookaside storage is broken")
            return
        super().do_GET()


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """A loopback HTTP server for ``directory``; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@attrs.frozen
class SignedRegistry:
    """A docker-registry whose images skopeo signed into the lookaside directory ``staging``."""

    registry: Registry
    staging: Path
    #: registries.d directories pointing at ``staging`` as file:// and (through ``http_base``) as http://
    registries_d_file: Path
    registries_d_http: Path
    http_base: str
    images: StandardImages

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"docker://{self.registry.authority}/{repository}:{tag}"

    def signature_dirs(self, repository: str) -> list[Path]:
        return sorted(self.staging.glob(f"{repository}@sha256=*"))


def write_registries_d(directory: Path, authority: str, lookaside: str, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["docker:", f"  {authority}:", f"    lookaside: {lookaside}"]
    lines += [f"    {key}: {str(value).lower() if isinstance(value, bool) else value}" for key, value in extra.items()]
    (directory / "test.yaml").write_text("\n".join(lines) + "\n")
    return directory


def manifest_digest(registry: Registry, repository: str) -> str:
    import hashlib
    import urllib.request

    request = urllib.request.Request(
        registry.url(f"/v2/{repository}/manifests/latest"),
        headers={"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return "sha256:" + hashlib.sha256(response.read()).hexdigest()


@pytest.fixture(scope="session")
def signed_registry(built: StandardImages, gpg: Gpg, tmp_path_factory: pytest.TempPathFactory):
    """test/signed, test/unsigned, test/wrongkey, test/wrongid (signed as another repository), test/tampered
    (another manifest under the tag, the old signature moved to its digest), test/list-instance (a list whose
    instances are signed, not the list) and test/list-only (the list signed, not its instances)."""
    from tests.support.registry import registry_process

    root = tmp_path_factory.mktemp("signed-registry")
    staging = root / "lookaside"
    staging.mkdir()
    layout = built.layout.path
    with registry_process(root / "registry") as registry, http_server(staging) as http_base:
        dest = f"docker://{registry.authority}"
        push_d = write_registries_d(root / "push.d", registry.authority, f"file://{staging}")
        push = ["--registries.d", str(push_d)]
        tls = ["--dest-tls-verify=false"]

        def copy(tag: str, repository: str, key: GpgKey | None, *flags: str) -> None:
            skopeo_copy_signed(gpg, f"oci:{layout}:{tag}", f"{dest}/{repository}:latest", key, [*tls, *flags], push)

        copy("latest", "test/signed", gpg.trusted)
        copy("latest", "test/unsigned", None)
        copy("latest", "test/wrongkey", gpg.other)
        copy("latest", "test/wrongid", gpg.trusted, "--sign-identity", f"{registry.authority}/test/other:latest")
        copy("latest", "test/tampered", gpg.trusted)
        old = manifest_digest(registry, "test/tampered")
        copy("nolayers", "test/tampered", None)
        new = manifest_digest(registry, "test/tampered")
        assert old != new
        old_dir = staging / f"test/tampered@{old.replace(':', '=')}"
        shutil.copytree(old_dir, staging / f"test/tampered@{new.replace(':', '=')}")
        for repository in ("test/list-instance", "test/list-only"):
            copy("multi", repository, gpg.trusted, "--all")
        list_instance = manifest_digest(registry, "test/list-instance")
        shutil.rmtree(staging / f"test/list-instance@{list_instance.replace(':', '=')}")
        list_only = manifest_digest(registry, "test/list-only")
        for path in staging.glob("test/list-only@*"):
            if path.name != f"list-only@{list_only.replace(':', '=')}":
                shutil.rmtree(path)
        yield SignedRegistry(
            registry,
            staging,
            push_d,
            write_registries_d(root / "http.d", registry.authority, http_base),
            http_base,
            built,
        )
