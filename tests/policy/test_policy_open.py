"""OpenImage under a policy, beyond the differential cases: manifest lists, policy files that cannot be used,
OpenImageOptional, --insecure-policy / --require-signed, and error texts that carry no credentials."""

from __future__ import annotations

import pytest

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.policy.conftest import write_registries_d
from tests.policy.decisions import REJECTED, ours, skopeo_decision, write_policy
from tests.support.images import AMD64

TLS = ["--tls-verify=false"]


def _gpg_policy(tmp_path, gpg, authority, name="policy.json"):
    requirement = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(gpg.trusted.armored)}
    return write_policy(
        tmp_path, {"default": [{"type": "reject"}], "transports": {"docker": {authority: [requirement]}}}, name
    )


async def test_a_list_is_accepted_when_only_the_list_is_signed(signed_registry, gpg, our_proxy_argv, tmp_path):
    """The newest upstream rule: the list's signature or the chosen instance's. (skopeo 1.9.3's copy checks
    only the instance, so it is no reference here: it refuses this image.)"""
    policy = _gpg_policy(tmp_path, gpg, signed_registry.registry.authority)
    flags = [*TLS, "--policy", str(policy), "--registries.d", str(signed_registry.registries_d_file)]
    ref = signed_registry.ref
    got = await ours(our_proxy_argv, flags, [ref("test/list-only"), ref("test/list-instance"), ref("test/unsigned")])
    assert [d.accepted for d in got] == [True, True, False], [d.text for d in got]
    assert not skopeo_decision(ref("test/list-only"), flags[1:]).accepted


async def test_a_list_with_no_signature_names_both_reasons(signed_registry, gpg, our_proxy_argv, tmp_path):
    # test/list-only's signature is for the list; with a key that does not match it nothing is accepted
    requirement = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(gpg.other.armored)}
    policy = write_policy(tmp_path, {"default": [requirement]})
    flags = [*TLS, "--policy", str(policy), "--registries.d", str(signed_registry.registries_d_file)]
    ref = signed_registry.ref("test/list-only")
    [decision] = await ours(our_proxy_argv, flags, [ref])
    assert not decision.accepted
    assert "neither the manifest list nor its instance" in decision.text and ref in decision.text


async def test_an_unreadable_policy_refuses_every_open_and_the_daemon_keeps_serving(
    dir_images, our_proxy_argv, tmp_path
):
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": [{"type": "insecureAcceptAnything"}], "transport": {}}')
    missing = tmp_path / "missing.json"
    for policy, expected in ((bad, f'invalid policy in "{bad}": transport: unknown key'), (missing, f"open {missing}")):
        image = f"dir:{dir_images.signed}"
        got = await ours(our_proxy_argv, ["--policy", str(policy)], [image, image])
        assert [d.accepted for d in got] == [False, False]
        assert all(expected in d.text for d in got), got
        assert not skopeo_decision(image, ["--policy", str(policy)]).accepted


async def test_open_image_optional_answers_not_found_before_the_policy(signed_registry, our_proxy_argv, tmp_path):
    policy = write_policy(tmp_path, {"default": [{"type": "reject"}]})
    async with ImageProxy.spawn([*our_proxy_argv, *AMD64, *TLS, "--policy", str(policy)]) as proxy:
        assert await proxy.open_image_optional(signed_registry.ref("test/does-not-exist")) is None
        with pytest.raises(ProxyError, match=REJECTED):
            await proxy.open_image_optional(signed_registry.ref("test/signed"))


async def test_insecure_policy_and_require_signed(signed_registry, gpg, our_proxy_argv, tmp_path):
    reject_all = write_policy(tmp_path, {"default": [{"type": "reject"}]}, "reject.json")
    accept_all = write_policy(tmp_path, {"default": [{"type": "insecureAcceptAnything"}]}, "accept.json")
    gpg_policy = _gpg_policy(tmp_path, gpg, signed_registry.registry.authority, "gpg.json")
    regd = ["--registries.d", str(signed_registry.registries_d_file)]
    signed = signed_registry.ref("test/signed")
    [insecure] = await ours(our_proxy_argv, [*TLS, "--policy", str(reject_all), "--insecure-policy"], [signed])
    assert insecure.accepted, insecure.text
    [unverified] = await ours(our_proxy_argv, [*TLS, "--policy", str(accept_all), "--require-signed"], [signed])
    assert not unverified.accepted and "--require-signed" in unverified.text
    [verified] = await ours(our_proxy_argv, [*TLS, *regd, "--policy", str(gpg_policy), "--require-signed"], [signed])
    assert verified.accepted, verified.text


async def test_lookaside_errors_carry_no_credentials(signed_registry, gpg, our_proxy_argv, tmp_path):
    authority = signed_registry.registry.authority
    secret = "s3cr3t-passw0rd"
    base = signed_registry.http_base.replace("http://", f"http://lookaside-user:{secret}@") + "/broken"
    registries_d = write_registries_d(tmp_path / "regd", authority, base)
    policy = _gpg_policy(tmp_path, gpg, authority)
    flags = [*TLS, "--policy", str(policy), "--registries.d", str(registries_d)]
    [decision] = await ours(our_proxy_argv, flags, [signed_registry.ref("test/signed")])
    assert not decision.accepted
    assert "status 500" in decision.text and "127.0.0.1" in decision.text, decision.text
    assert secret not in decision.text and "lookaside-user" not in decision.text
