"""sigstoreSigned with public keys: signatures made with ``cryptography`` in cosign's layout (see
sigstore_signing.py for why not by skopeo), in ``dir:`` and as registry attachments (``sha256-<hex>.sig``)."""

from __future__ import annotations

import base64
import shutil

import pytest

from tests.policy.conftest import manifest_digest, skopeo_copy_signed, write_registries_d
from tests.policy.decisions import REJECTED, ours, write_policy
from tests.policy.sigstore_signing import new_key, payload, public_pem, push_attachment, sign, write_dir_signature
from tests.support.images import sha256_digest

TLS = ["--tls-verify=false"]
DIR_IDENTITY = "registry.example/test/sigstore:1"


def _sigstore(key_path, identity) -> dict:
    return {"type": "sigstoreSigned", "keyPath": str(key_path), "signedIdentity": identity}


@pytest.fixture(scope="module")
def sigstore_dirs(dir_images, tmp_path_factory):
    """dir: copies of the unsigned image with sigstore signatures by ecdsa, ed25519 and rsa keys."""
    root = tmp_path_factory.mktemp("sigstore-dirs")
    digest = sha256_digest((dir_images.unsigned / "manifest.json").read_bytes())
    keys = {kind: new_key(kind) for kind in ("ecdsa", "ed25519", "rsa")}
    for kind, key in keys.items():
        shutil.copytree(dir_images.unsigned, root / kind)
        write_dir_signature(root / kind, 1, key, digest, DIR_IDENTITY)
        (root / f"{kind}.pub").write_bytes(public_pem(key))
    (root / "stranger.pub").write_bytes(public_pem(new_key("ecdsa")))
    return root


async def test_dir_sigstore_signatures_each_key_type(sigstore_dirs, our_proxy_argv, tmp_path):
    exact = {"type": "exactReference", "dockerReference": DIR_IDENTITY}
    for kind in ("ecdsa", "ed25519", "rsa"):
        policy = write_policy(tmp_path, {"default": [_sigstore(sigstore_dirs / f"{kind}.pub", exact)]})
        others = [k for k in ("ecdsa", "ed25519", "rsa") if k != kind]
        refs = [f"dir:{sigstore_dirs / kind}", *(f"dir:{sigstore_dirs / k}" for k in others)]
        got = await ours(our_proxy_argv, ["--policy", str(policy)], refs)
        assert [d.accepted for d in got] == [True, False, False], [d.text for d in got]
        assert "no configured public key verifies it" in got[1].text


async def test_dir_sigstore_key_data_wrong_key_and_identity(sigstore_dirs, our_proxy_argv, tmp_path):
    exact = {"type": "exactReference", "dockerReference": DIR_IDENTITY}
    key_data = base64.b64encode((sigstore_dirs / "ecdsa.pub").read_bytes()).decode()
    stranger = base64.b64encode((sigstore_dirs / "stranger.pub").read_bytes()).decode()
    image = f"dir:{sigstore_dirs / 'ecdsa'}"
    cases = [
        ({"type": "sigstoreSigned", "keyData": key_data, "signedIdentity": exact}, True),
        ({"type": "sigstoreSigned", "keyDatas": [stranger, key_data], "signedIdentity": exact}, True),
        ({"type": "sigstoreSigned", "keyData": stranger, "signedIdentity": exact}, False),
        (_sigstore(sigstore_dirs / "ecdsa.pub", {"type": "exactRepository", "dockerRepository": "x.example/y"}), False),
        # a GPG requirement ignores sigstore signatures
        ({"type": "signedBy", "keyType": "GPGKeys", "keyData": key_data, "signedIdentity": exact}, False),
    ]
    for requirement, expected in cases:
        policy = write_policy(tmp_path, {"default": [requirement]})
        [decision] = await ours(our_proxy_argv, ["--policy", str(policy)], [image])
        assert decision.accepted == expected, (requirement, decision.text)
        if not expected:
            assert image in decision.text and "scope default" in decision.text


@pytest.fixture(scope="module")
def sigstore_registry(signed_registry, gpg, tmp_path_factory):
    """test/sigstore (unsigned by GPG) with a sigstore attachment by an ECDSA key; registries.d with and
    without use-sigstore-attachments."""
    registry = signed_registry.registry
    layout = signed_registry.images.layout.path
    push_d = signed_registry.registries_d_file
    skopeo_copy_signed(
        gpg,
        f"oci:{layout}:latest",
        f"docker://{registry.authority}/test/sigstore:latest",
        None,
        ["--dest-tls-verify=false"],
        ["--registries.d", str(push_d)],
    )
    digest = manifest_digest(registry, "test/sigstore")
    key = new_key("ecdsa")
    root = tmp_path_factory.mktemp("sigstore-registry")
    (root / "cosign.pub").write_bytes(public_pem(key))
    good = payload(digest, f"{registry.authority}/test/sigstore:latest")
    other_identity = payload(digest, f"{registry.authority}/test/elsewhere:latest")
    push_attachment(
        registry.url(""),
        "test/sigstore",
        digest,
        [(other_identity, sign(key, other_identity)), (good, sign(key, good))],
    )
    lookaside = f"file://{signed_registry.staging}"
    return {
        "ref": f"docker://{registry.authority}/test/sigstore:latest",
        "key": root / "cosign.pub",
        "with": write_registries_d(
            root / "with.d", registry.authority, lookaside, **{"use-sigstore-attachments": True}
        ),
        "without": write_registries_d(root / "without.d", registry.authority, lookaside),
    }


async def test_registry_sigstore_attachments(sigstore_registry, our_proxy_argv, tmp_path):
    ref = sigstore_registry["ref"]
    policy = write_policy(
        tmp_path, {"default": [_sigstore(sigstore_registry["key"], {"type": "matchRepoDigestOrExact"})]}
    )
    [accepted] = await ours(
        our_proxy_argv, [*TLS, "--policy", str(policy), "--registries.d", str(sigstore_registry["with"])], [ref]
    )
    assert accepted.accepted, accepted.text
    [refused] = await ours(
        our_proxy_argv, [*TLS, "--policy", str(policy), "--registries.d", str(sigstore_registry["without"])], [ref]
    )
    assert not refused.accepted
    assert REJECTED in refused.text and "no signature exists" in refused.text
    exact_other = {"type": "exactRepository", "dockerRepository": "elsewhere.example/test/sigstore"}
    policy = write_policy(tmp_path, {"default": [_sigstore(sigstore_registry["key"], exact_other)]}, "other.json")
    [wrong_identity] = await ours(
        our_proxy_argv, [*TLS, "--policy", str(policy), "--registries.d", str(sigstore_registry["with"])], [ref]
    )
    assert not wrong_identity.accepted
    assert "none of the signatures were accepted" in wrong_identity.text, wrong_identity.text


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"fulcio": {"caPath": "/nonexistent/ca.pem", "oidcIssuer": "https://x", "subjectEmail": "a@b"}}, "fulcio"),
        ({"keyPath": "/nonexistent/k.pub", "rekorPublicKeyPath": "/nonexistent/rekor.pub"}, "rekorPublicKeyPath"),
        ({"pki": {"caRootsPath": "/nonexistent/roots.pem"}}, "pki"),
    ],
)
async def test_unsupported_sigstore_requirements_refuse_and_say_so(extra, named, dir_images, our_proxy_argv, tmp_path):
    requirement = {"type": "sigstoreSigned", **extra, "signedIdentity": {"type": "matchRepository"}}
    policy = write_policy(tmp_path, {"default": [requirement]})
    image = f"dir:{dir_images.signed}"
    [decision] = await ours(our_proxy_argv, ["--policy", str(policy)], [image])
    assert not decision.accepted
    assert named in decision.text and "not supported" in decision.text and image in decision.text
