"""Registry authentication end to end: the real docker-registry in token mode (with a test token issuer),
images pushed by the real skopeo with credentials, pulled through our proxy with skopeo's flags."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ErrorCode, ProxyError
from tests.http.registry import Registry, RegistryOptions, TokenAuth, run_registry
from tests.http.token_issuer import TokenIssuer, serve_issuer
from tests.support.images import SKOPEO_HINT, StandardImages, require_skopeo

PASSWORD = "s3cret-pässword"
INSECURE = ["--tls-verify=false"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def token_registry(tmp_path: Path, built: StandardImages) -> AsyncIterator[tuple[Registry, TokenIssuer]]:
    """A token-auth registry: alice may pull and push everything, anyone may pull public/app; both
    private/app and public/app hold the single-arch test image."""
    grants = {None: {"public/app": frozenset({"pull"})}, "alice": {"*": frozenset({"pull", "push"})}}
    issuer = TokenIssuer(users={"alice": PASSWORD}, grants=grants)  # type: ignore[arg-type]
    async with serve_issuer(issuer):
        config = issuer.registry_auth_config(tmp_path / "token-root.pem")
        options = RegistryOptions(token=TokenAuth.from_config(config))
        async with run_registry(tmp_path / "registry", options) as registry:
            for repository in ("private/app", "public/app"):
                await push(built, f"docker://{registry.authority}/{repository}:latest", f"alice:{PASSWORD}")
            issuer.requests.clear()
            yield registry, issuer


async def push(built: StandardImages, destination: str, creds: str) -> None:
    try:
        skopeo = require_skopeo()
    except RuntimeError:
        pytest.fail(SKOPEO_HINT, pytrace=False)
    result = await trio.run_process(
        [
            skopeo,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"--dest-creds={creds}",
            f"oci:{built.layout.path}:latest",
            destination,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()


async def read_single(extra_args: list[str], ref: str, built: StandardImages) -> None:
    async with ImageProxy.spawn(extra_args=[*INSECURE, *extra_args]) as proxy:
        img = await proxy.open_image(ref)
        digest, _ = await proxy.get_manifest(img)
        assert digest == built.single.manifest_digest
        layer = built.single.layers[-1]
        assert sha256(await proxy.get_blob(img, layer.digest, layer.size)) == layer.digest


async def test_token_auth_with_creds_flag(tmp_path, built):
    async with token_registry(tmp_path, built) as (registry, issuer):
        await read_single(["--creds", f"alice:{PASSWORD}"], f"docker://{registry.authority}/private/app", built)
        assert issuer.requests, "the token issuer was asked"
        assert all(r.user == "alice" and r.status == 200 for r in issuer.requests), issuer.requests


async def test_anonymous_pull_of_a_public_repository(tmp_path, built):
    async with token_registry(tmp_path, built) as (registry, _):
        await read_single([], f"docker://{registry.authority}/public/app", built)


async def test_anonymous_pull_of_a_private_repository_says_who_refused(tmp_path, built):
    async with token_registry(tmp_path, built) as (registry, _), ImageProxy.spawn(extra_args=INSECURE) as proxy:
        with pytest.raises(ProxyError) as info:
            await proxy.open_image(f"docker://{registry.authority}/private/app:latest")
    text = str(info.value)
    assert registry.authority in text and "no credentials were sent" in text, text
    assert info.value.code is ErrorCode.OTHER
    assert PASSWORD not in text


async def test_wrong_password_is_refused_without_leaking_it(tmp_path, built):
    wrong = [*INSECURE, "--creds", "alice:wrong-password"]
    async with token_registry(tmp_path, built) as (registry, _), ImageProxy.spawn(extra_args=wrong) as proxy:
        with pytest.raises(ProxyError) as info:
            await proxy.open_image(f"docker://{registry.authority}/private/app:latest")
    assert "wrong-password" not in str(info.value)
    assert "alice" in str(info.value)


async def test_credentials_from_an_auth_file(tmp_path, built):
    async with token_registry(tmp_path, built) as (registry, _):
        authfile = tmp_path / "auth.json"
        token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        authfile.write_text(json.dumps({"auths": {registry.authority: {"auth": token}}}))
        await read_single(["--authfile", str(authfile)], f"docker://{registry.authority}/private/app", built)


async def test_no_creds_stays_anonymous_even_with_an_auth_file(tmp_path, built, monkeypatch):
    async with token_registry(tmp_path, built) as (registry, _):
        authfile = tmp_path / "auth.json"
        token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        authfile.write_text(json.dumps({"auths": {registry.authority: {"auth": token}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
        async with ImageProxy.spawn(extra_args=[*INSECURE, "--no-creds"]) as proxy:
            with pytest.raises(ProxyError, match="no credentials were sent"):
                await proxy.open_image(f"docker://{registry.authority}/private/app:latest")


async def test_credentials_from_a_credential_helper_named_in_registries_conf(tmp_path, built, monkeypatch):
    async with token_registry(tmp_path, built) as (registry, issuer):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        helper = bin_dir / "docker-credential-imageproxytest"
        asked = tmp_path / "asked"
        helper.write_text(
            "#!/bin/sh\n"
            f'read host; echo "$1 $host" >> {asked}\n'
            f'printf \'{{"ServerURL":"%s","Username":"alice","Secret":"{PASSWORD}"}}\' "$host"\n'
        )
        helper.chmod(0o755)
        conf = tmp_path / "registries.conf"
        conf.write_text('credential-helpers = ["imageproxytest"]\n')
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        ref = f"docker://{registry.authority}/private/app"
        await read_single(["--registries-conf", str(conf)], ref, built)
        assert asked.read_text().split() == ["get", registry.authority]
        assert issuer.requests and all(r.user == "alice" for r in issuer.requests)
