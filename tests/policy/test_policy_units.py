"""Unit tests of the policy package: parsing, scopes, identity rules, registries.d, stored signatures."""

from __future__ import annotations

import json

import pytest

from proxy.image.reference import parse_docker_reference
from proxy.policy import PolicyFileError, parse_policy
from proxy.policy import policy_file as pf
from proxy.policy.errors import InvalidSignature
from proxy.policy.gpg import KeyProblem, _parse_status, dearmor
from proxy.policy.identity import IdentityRule
from proxy.policy.payload import SIMPLE_SIGNING_TYPE, parse_payload
from proxy.policy.registries_d import load_registries_d
from proxy.policy.requirements import InsecureAcceptAnything, Reject, SignedBy, SigstoreSigned
from proxy.policy.scopes import image_scope
from proxy.policy.signatures import SigstoreSignature, SimpleSignature, parse_stored_signature, redact

ACCEPT = [{"type": "insecureAcceptAnything"}]
DIGEST = "sha256:" + "a" * 64


def _parse(doc) -> pf.Policy:
    return parse_policy(json.dumps(doc).encode(), "/etc/p.json")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "default: default policy is missing"),
        ({"default": []}, "default: the list of requirements must not be empty"),
        ({"default": ACCEPT, "extra": 1}, "extra: unknown key"),
        ({"default": [{"type": "acceptEverything"}]}, "default[0].type: unknown policy requirement type"),
        ({"default": [{"type": "reject", "why": "x"}]}, "default[0].why: unknown key"),
        ({"default": [{"type": "signedBy", "keyPath": "/k"}]}, "default[0].keyType: missing"),
        ({"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}, "exactly one of keyPath, keyPaths, keyData"),
        (
            {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/a", "keyData": "YQ=="}]},
            "found keyPath, keyData",
        ),
        ({"default": [{"type": "signedBy", "keyType": "PGP", "keyPath": "/a"}]}, "unrecognized keyType"),
        ({"default": [{"type": "sigstoreSigned", "keyPath": "/a"}]}, "signedIdentity: missing"),
        (
            {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/a", "signedIdentity": {"type": "x"}}]},
            "unknown policy reference match type",
        ),
        (
            {
                "default": [
                    {
                        "type": "signedBy",
                        "keyType": "GPGKeys",
                        "keyPath": "/a",
                        "signedIdentity": {"type": "exactReference", "dockerReference": "quay.io/a/b"},
                    }
                ]
            },
            "contains neither a tag nor a digest",
        ),
        ({"default": ACCEPT, "transports": {"dir": {"relative/path": ACCEPT}}}, "must be an absolute path"),
        ({"default": ACCEPT, "transports": {"dir": {"/a/../b": ACCEPT}}}, "non-canonical"),
        ({"default": ACCEPT, "transports": {"docker-archive": {"/a": ACCEPT}}}, "does not support any scopes"),
    ],
)
def test_policy_errors_name_the_file_and_the_key(doc, message):
    with pytest.raises(PolicyFileError) as caught:
        _parse(doc)
    assert str(caught.value).startswith('invalid policy in "/etc/p.json": ')
    assert message in str(caught.value)


def test_duplicate_keys_are_refused():
    with pytest.raises(PolicyFileError, match="duplicate key 'default'"):
        parse_policy(b'{"default": [{"type": "reject"}], "default": [{"type": "insecureAcceptAnything"}]}', "/p")


def test_requirements_parse_into_types():
    policy = _parse(
        {
            "default": [{"type": "reject"}],
            "transports": {
                "docker": {
                    "quay.io": ACCEPT,
                    "quay.io/org": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": "YWJj"}],
                    "*.example.com": [
                        {
                            "type": "sigstoreSigned",
                            "keyPaths": ["/a", "/b"],
                            "signedIdentity": {"type": "matchRepository"},
                        }
                    ],
                },
                "unknown-transport": {"anything": ACCEPT},
            },
        }
    )
    assert policy.default == (Reject(),)
    assert policy.transports["docker"]["quay.io"] == (InsecureAcceptAnything(),)
    [signed_by] = policy.transports["docker"]["quay.io/org"]
    assert isinstance(signed_by, SignedBy) and signed_by.key_data == b"abc"
    [sigstore] = policy.transports["docker"]["*.example.com"]
    assert isinstance(sigstore, SigstoreSigned) and sigstore.key_paths == ("/a", "/b") and sigstore.unsupported is None


def test_the_most_specific_scope_wins():
    policy = _parse(
        {
            "default": [{"type": "reject"}],
            "transports": {
                "docker": {
                    "": ACCEPT,
                    "quay.io": ACCEPT,
                    "quay.io/org": ACCEPT,
                    "quay.io/org/app:v1": ACCEPT,
                    "*.example.com": ACCEPT,
                },
                "dir": {"/srv/images": ACCEPT},
            },
        }
    )

    def scope(reference: str) -> str:
        return policy.requirements_for(image_scope(reference))[0]

    assert scope("docker://quay.io/org/app:v1") == 'transports.docker["quay.io/org/app:v1"]'
    assert scope("docker://quay.io/org/app:v2") == 'transports.docker["quay.io/org"]'
    assert scope("docker://quay.io/other/app") == 'transports.docker["quay.io"]'
    assert scope("docker://reg.sub.example.com:5000/a/b") == 'transports.docker["*.example.com"]'
    assert scope("docker://docker.io/library/busybox") == 'transports.docker[""]'
    assert scope("dir:/srv/images/app") == 'transports.dir["/srv/images"]'
    assert scope("dir:/srv/other") == "default"
    assert scope("oci:/srv/images/layout:tag") == "default"


def test_image_scopes():
    docker = image_scope("docker://quay.io:443/a/b")
    assert docker.identity == "quay.io:443/a/b:latest"
    assert docker.namespaces == ("quay.io:443/a/b", "quay.io:443/a", "quay.io:443", "*.io")
    oci = image_scope("oci:/srv/x/layout:v1")
    assert (oci.identity, oci.namespaces) == ("/srv/x/layout:v1", ("/srv/x/layout", "/srv/x", "/srv"))
    assert image_scope("dir:/srv/x/d").namespaces == ("/srv/x", "/srv")
    archive = image_scope("docker-archive:/a.tar:quay.io/a/b:1")
    assert archive.identity == "" and str(archive.docker_reference) == "quay.io/a/b:1"


@pytest.mark.parametrize(
    ("rule", "image", "signed", "expected"),
    [
        (IdentityRule("matchRepoDigestOrExact"), "quay.io/a/b:1", "quay.io/a/b:1", True),
        (IdentityRule("matchRepoDigestOrExact"), "quay.io/a/b:1", "quay.io/a/b:2", False),
        (IdentityRule("matchRepoDigestOrExact"), f"quay.io/a/b@{DIGEST}", "quay.io/a/b:2", True),
        (IdentityRule("matchRepoDigestOrExact"), f"quay.io/a/b@{DIGEST}", "quay.io/a/c:2", False),
        (IdentityRule("matchRepository"), "quay.io/a/b:1", "quay.io/a/b:7", True),
        (IdentityRule("matchExact"), f"quay.io/a/b@{DIGEST}", f"quay.io/a/b@{DIGEST}", True),
        (IdentityRule("matchExact"), "quay.io/a/b:1", "quay.io/a/b", False),
        (
            IdentityRule("remapIdentity", prefix="mirror.local/q", signed_prefix="quay.io"),
            "mirror.local/q/a:1",
            "quay.io/a:1",
            True,
        ),
        (
            IdentityRule("remapIdentity", prefix="mirror.local/q", signed_prefix="quay.io"),
            "mirror.local/qx/a:1",
            "quay.io/a:1",
            False,
        ),
        (IdentityRule("matchRepository"), None, "quay.io/a/b:1", False),
        (
            IdentityRule("exactReference", reference=parse_docker_reference("quay.io/a/b:1")),
            None,
            "quay.io/a/b:1",
            True,
        ),
        (
            IdentityRule("exactRepository", reference=parse_docker_reference("busybox")),
            None,
            "docker.io/library/busybox:1",
            True,
        ),
    ],
)
def test_identity_rules(rule, image, signed, expected):
    image_ref = parse_docker_reference(image) if image else None
    assert rule.matches(image_ref, parse_docker_reference(signed)) is expected


def test_default_policy_path(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "SYSTEM_POLICY_PATH", str(tmp_path / "etc-policy.json"))
    home = tmp_path / "home"
    with pytest.raises(PolicyFileError) as caught:
        pf.default_policy_path({"HOME": str(home)})
    assert str(caught.value) == (
        f'no policy.json file found at any of the following: "{home}/.config/containers/policy.json", '
        f'"{tmp_path}/etc-policy.json" (pass --policy FILE, or write a containers-policy.json(5) to one of them; '
        "the containers-common package installs /etc/containers/policy.json)"
    )
    (tmp_path / "etc-policy.json").write_text("{}")
    assert pf.default_policy_path({"HOME": str(home)}) == str(tmp_path / "etc-policy.json")
    (home / ".config/containers").mkdir(parents=True)
    (home / ".config/containers/policy.json").write_text("{}")
    assert pf.default_policy_path({"HOME": str(home)}) == f"{home}/.config/containers/policy.json"


def test_registries_d_most_specific_namespace(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "default-docker:\n  lookaside: https://sigs.example/default\n"
        "docker:\n  quay.io/org:\n    use-sigstore-attachments: true\n"
        "  quay.io:\n    sigstore: file:///var/sigs\n"
    )
    (tmp_path / "b.yaml").write_text("docker:\n  registry.local:\n    lookaside: http://l.local/s\n")
    (tmp_path / "ignored.conf").write_text("not: [yaml")
    config = load_registries_d(str(tmp_path))
    ref = parse_docker_reference("quay.io/org/app:1")
    assert config.lookaside_base(ref) == "file:///var/sigs/org/app"
    assert config.use_sigstore_attachments(ref)
    other = parse_docker_reference("docker.io/library/busybox")
    assert config.lookaside_base(other) == "https://sigs.example/default/library/busybox"
    assert not config.use_sigstore_attachments(other)
    (tmp_path / "c.yaml").write_text("docker:\n  quay.io:\n    lookaside: file:///x\n")
    with pytest.raises(PolicyFileError, match=r"quay\.io is defined both in"):
        load_registries_d(str(tmp_path))
    assert load_registries_d(str(tmp_path / "missing")).docker == {}


def test_stored_signature_formats():
    assert parse_stored_signature(b"\x89raw", "s") == SimpleSignature(b"\x89raw", "s")
    assert parse_stored_signature(b"\x00simple-signing\nabc", "s") == SimpleSignature(b"abc", "s")
    stored = b'\x00sigstore-json\n{"mimeType":"m","payload":"YWJj","annotations":{"k":"v"}}'
    assert parse_stored_signature(stored, "s") == SigstoreSignature("m", b"abc", {"k": "v"}, "s")
    with pytest.raises(Exception, match="unrecognized signature format 'x509'"):
        parse_stored_signature(b"\x00x509\n...", "s")


def test_payload_parsing_is_strict():
    good = {
        "critical": {
            "type": SIMPLE_SIGNING_TYPE,
            "image": {"docker-manifest-digest": DIGEST},
            "identity": {"docker-reference": "quay.io/a:1"},
        },
        "optional": {"creator": "x"},
    }
    claims = parse_payload(json.dumps(good).encode(), SIMPLE_SIGNING_TYPE)
    assert (claims.manifest_digest, claims.docker_reference) == (DIGEST, "quay.io/a:1")
    for broken in (
        {**good, "extra": 1},
        {"critical": {**good["critical"], "more": 1}},
        {"critical": {**good["critical"], "type": "cosign container image signature"}},
        {"critical": {**good["critical"], "image": {"docker-manifest-digest": "md5:x"}}},
    ):
        with pytest.raises(InvalidSignature):
            parse_payload(json.dumps(broken).encode(), SIMPLE_SIGNING_TYPE)


def test_gpg_status_needs_exactly_one_good_signature():
    good = "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG AB x\n[GNUPG:] VALIDSIG " + " ".join(["FPR"] * 10) + " PRIMARY\n"
    assert _parse_status(good) == ("PRIMARY", [])
    assert _parse_status(good + "[GNUPG:] NEWSIG\n[GNUPG:] BADSIG CD y\n")[0] is None
    assert _parse_status(good.replace("GOODSIG", "EXPKEYSIG"))[0] is None


def test_dearmor_and_redact():
    assert dearmor(b"\x99binary", "k") == b"\x99binary"
    armored = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: x\n\nYWJj\n=AAAA\n-----END PGP PUBLIC KEY BLOCK-----\n"
    assert dearmor(armored, "k") == b"abc"
    with pytest.raises(KeyProblem):
        dearmor(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!\n-----END PGP PUBLIC KEY BLOCK-----\n", "k")
    assert redact("https://u:p@h.example:8443/p/a?token=t#f") == "https://h.example:8443/p/a"
