"""Differential: the same policy files and images, decided by our OpenImage and by the real skopeo.

Images are signed by the real ``skopeo copy --sign-by`` with a throwaway GPG key: in ``dir:`` layouts and in
a real docker-registry with a lookaside directory read as ``file://`` and over ``http://``. Accept / reject
must agree in every case; our refusals must name the image, the scope that matched and the reason.
"""

from __future__ import annotations

import base64

import pytest

from tests.policy.conftest import DIR_IDENTITY
from tests.policy.decisions import REJECTED, ours, skopeo_decision, write_policy

TLS = ["--tls-verify=false"]


def _signed_by(key_path, **extra) -> dict:
    return {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key_path), **extra}


async def _compare(our_proxy_argv, flags, cases, tmp_path):
    """``cases``: (reference, expected accepted). Both sides must decide as expected."""
    references = [reference for reference, _ in cases]
    got = await ours(our_proxy_argv, [*TLS, *flags], references)
    for (reference, expected), decision in zip(cases, got, strict=True):
        reference_decision = skopeo_decision(reference, flags)
        assert reference_decision.accepted == expected, f"skopeo: {reference}: {reference_decision.text}"
        assert decision.accepted == expected, f"ours: {reference}: {decision.text}"
        if not expected:
            assert reference in decision.text and REJECTED in decision.text, decision.text
    return got


@pytest.mark.parametrize("lookaside", ["file", "http"])
async def test_registry_images_signed_by_skopeo(lookaside, signed_registry, gpg, our_proxy_argv, tmp_path):
    authority = signed_registry.registry.authority
    policy = write_policy(
        tmp_path,
        {
            "default": [{"type": "reject"}],
            "transports": {"docker": {f"{authority}/test": [_signed_by(gpg.trusted.armored)]}},
        },
    )
    registries_d = signed_registry.registries_d_file if lookaside == "file" else signed_registry.registries_d_http
    flags = ["--policy", str(policy), "--registries.d", str(registries_d)]
    ref = signed_registry.ref
    cases = [
        (ref("test/signed"), True),
        (ref("test/unsigned"), False),
        (ref("test/wrongkey"), False),
        (ref("test/wrongid"), False),
        (ref("test/tampered"), False),
        (ref("test/list-instance"), True),
    ]
    got = await _compare(our_proxy_argv, flags, cases, tmp_path)
    scope = f'scope transports.docker["{authority}/test"]'
    texts = {reference: d.text for (reference, _), d in zip(cases, got, strict=True)}
    assert scope in texts[ref("test/unsigned")]
    assert "no signature exists" in texts[ref("test/unsigned")]
    assert "invalid GPG signature" in texts[ref("test/wrongkey")]
    assert "is not accepted" in texts[ref("test/wrongid")] and "test/other" in texts[ref("test/wrongid")]
    assert "does not match" in texts[ref("test/tampered")]


async def test_dir_images_signed_by_skopeo(dir_images, gpg, our_proxy_argv, tmp_path):
    root = str(dir_images.signed.parent)
    exact = {"type": "exactReference", "dockerReference": DIR_IDENTITY}
    keydata = base64.b64encode(gpg.trusted.binary.read_bytes()).decode()
    policies = {
        "keyPath": [_signed_by(gpg.trusted.binary, signedIdentity=exact)],
        "keyPaths": [
            {
                "type": "signedBy",
                "keyType": "GPGKeys",
                "keyPaths": [str(gpg.other.armored), str(gpg.trusted.armored)],
                "signedIdentity": exact,
            }
        ],
        "keyData": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": keydata, "signedIdentity": exact}],
    }
    for name, requirements in policies.items():
        policy = write_policy(
            tmp_path, {"default": [{"type": "reject"}], "transports": {"dir": {root: requirements}}}, f"{name}.json"
        )
        cases = [
            (f"dir:{dir_images.signed}", True),
            (f"dir:{dir_images.wrong_key}", name == "keyPaths"),  # keyPaths trusts the "other" key too
        ]
        if name == "keyPath":
            cases += [(f"dir:{dir_images.unsigned}", False), (f"dir:{dir_images.tampered}", False)]
        await _compare(our_proxy_argv, ["--policy", str(policy)], cases, tmp_path)


async def test_dir_identity_rules(dir_images, gpg, our_proxy_argv, tmp_path):
    """A dir: image has no Docker reference: only exactReference / exactRepository can accept it."""
    signed = f"dir:{dir_images.signed}"
    for identity, expected in (
        ({"type": "exactReference", "dockerReference": "registry.example/test/signed:2"}, False),
        ({"type": "exactRepository", "dockerRepository": "registry.example/test/signed"}, True),
        ({"type": "matchRepoDigestOrExact"}, False),
    ):
        policy = write_policy(tmp_path, {"default": [_signed_by(gpg.trusted.armored, signedIdentity=identity)]})
        await _compare(our_proxy_argv, ["--policy", str(policy)], [(signed, expected)], tmp_path)


async def test_registry_identity_rules(signed_registry, gpg, our_proxy_argv, tmp_path):
    authority = signed_registry.registry.authority
    signed = signed_registry.ref("test/signed")
    for identity, expected in (
        ({"type": "matchRepository"}, True),
        ({"type": "exactRepository", "dockerRepository": f"{authority}/test/other"}, False),
        ({"type": "remapIdentity", "prefix": f"{authority}/test", "signedPrefix": f"{authority}/test"}, True),
    ):
        policy = write_policy(tmp_path, {"default": [_signed_by(gpg.trusted.armored, signedIdentity=identity)]})
        flags = ["--policy", str(policy), "--registries.d", str(signed_registry.registries_d_file)]
        await _compare(our_proxy_argv, flags, [(signed, expected)], tmp_path)
