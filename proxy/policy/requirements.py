"""The requirements of containers-policy.json, parsed strictly into typed values.

Parsing is as strict as containers/image's: an unknown key, a missing key, a duplicate key or an unknown
requirement type makes the whole file unusable (every image is then refused with that error). A
requirement that is valid but that image-proxy cannot evaluate (Fulcio or Rekor based ``sigstoreSigned``,
``pki``, ``signedBaseLayer``, keyTypes other than ``GPGKeys``) parses, and refuses every image it applies to
with an error naming it: it is never skipped.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import attrs

from proxy.policy.identity import DEFAULT_IDENTITY, IdentityRule, parse_identity

Fail = Callable[[str, str], NoReturn]

GPG_KEY_TYPES = ("GPGKeys", "signedByGPGKeys", "X509Certificates", "signedByX509CAs")


@attrs.frozen
class Requirement:
    """Base of the requirement types; ``type`` is the name policy.json uses."""

    @property
    def type(self) -> str:
        raise NotImplementedError

    #: whether accepting an image under this requirement means a signature was verified (--require-signed)
    verifies_signatures = True


@attrs.frozen
class InsecureAcceptAnything(Requirement):
    type = "insecureAcceptAnything"
    verifies_signatures = False


@attrs.frozen
class Reject(Requirement):
    type = "reject"


@attrs.frozen
class SignedBy(Requirement):
    """GPG simple signing: keys from files (``keyPath``, ``keyPaths``) or inline (``keyData``)."""

    type = "signedBy"
    key_type: str
    key_paths: tuple[str, ...] = ()
    key_data: bytes | None = None
    identity: IdentityRule = DEFAULT_IDENTITY


@attrs.frozen
class SigstoreSigned(Requirement):
    """A sigstore signature by one of the public keys (``keyPath``, ``keyPaths``, ``keyData``, ``keyDatas``).

    ``unsupported`` names what image-proxy cannot check (Fulcio, Rekor, pki): such a requirement refuses."""

    type = "sigstoreSigned"
    key_paths: tuple[str, ...] = ()
    key_datas: tuple[bytes, ...] = ()
    identity: IdentityRule = DEFAULT_IDENTITY
    unsupported: str | None = None


@attrs.frozen
class SignedBaseLayer(Requirement):
    """Defined by the format, implemented by nobody (containers/image refuses it too)."""

    type = "signedBaseLayer"


def _check_keys(doc: Mapping[str, Any], allowed: set[str], required: set[str], where: str, fail: Fail) -> None:
    for key in doc:
        if key not in allowed:
            fail(f"{where}.{key}", "unknown key")
    for key in sorted(required - set(doc)):
        fail(f"{where}.{key}", "missing")


def _string(doc: Mapping[str, Any], key: str, where: str, fail: Fail) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        fail(f"{where}.{key}", "must be a non-empty string")
    return value


def _strings(doc: Mapping[str, Any], key: str, where: str, fail: Fail) -> tuple[str, ...]:
    value = doc[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        fail(f"{where}.{key}", "must be a non-empty list of non-empty strings")
    return tuple(value)


def _base64(value: Any, where: str, fail: Fail) -> bytes:
    if not isinstance(value, str) or not value:
        fail(where, "must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        fail(where, "is not valid base64")


def _identity(doc: Mapping[str, Any], where: str, fail: Fail, *, required: bool) -> IdentityRule:
    if "signedIdentity" not in doc:
        if required:
            fail(f"{where}.signedIdentity", "missing")
        return DEFAULT_IDENTITY
    return parse_identity(doc["signedIdentity"], f"{where}.signedIdentity", fail)


def _one_of(doc: Mapping[str, Any], keys: tuple[str, ...], where: str, fail: Fail) -> str:
    present = [k for k in keys if k in doc]
    if len(present) != 1:
        found = "none of them present" if not present else f"found {', '.join(present)}"
        fail(where, f"exactly one of {', '.join(keys)} must be specified, {found}")
    return present[0]


def _signed_by(doc: Mapping[str, Any], where: str, fail: Fail) -> SignedBy:
    _check_keys(doc, {"type", "keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"}, {"keyType"}, where, fail)
    key_type = doc["keyType"]
    if key_type not in GPG_KEY_TYPES:
        fail(f"{where}.keyType", f"unrecognized keyType value {key_type!r}")
    source = _one_of(doc, ("keyPath", "keyPaths", "keyData"), where, fail)
    identity = _identity(doc, where, fail, required=False)
    if source == "keyPath":
        return SignedBy(key_type, key_paths=(_string(doc, "keyPath", where, fail),), identity=identity)
    if source == "keyPaths":
        return SignedBy(key_type, key_paths=_strings(doc, "keyPaths", where, fail), identity=identity)
    return SignedBy(key_type, key_data=_base64(doc["keyData"], f"{where}.keyData", fail), identity=identity)


_REKOR_KEYS = ("rekorPublicKeyPath", "rekorPublicKeyPaths", "rekorPublicKeyData", "rekorPublicKeyDatas")


def _sigstore_signed(doc: Mapping[str, Any], where: str, fail: Fail) -> SigstoreSigned:
    sources = ("keyPath", "keyPaths", "keyData", "keyDatas", "fulcio", "pki")
    _check_keys(doc, {"type", "signedIdentity", *sources, *_REKOR_KEYS}, set(), where, fail)
    source = _one_of(doc, sources, where, fail)
    identity = _identity(doc, where, fail, required=True)
    rekor = [k for k in _REKOR_KEYS if k in doc]
    if source in ("fulcio", "pki"):
        if not isinstance(doc[source], Mapping):
            fail(f"{where}.{source}", "must be a JSON object")
        return SigstoreSigned(identity=identity, unsupported=f"sigstoreSigned with {source} (certificate-based)")
    if source == "keyPath":
        requirement = SigstoreSigned(key_paths=(_string(doc, "keyPath", where, fail),), identity=identity)
    elif source == "keyPaths":
        requirement = SigstoreSigned(key_paths=_strings(doc, "keyPaths", where, fail), identity=identity)
    elif source == "keyData":
        requirement = SigstoreSigned(key_datas=(_base64(doc["keyData"], f"{where}.keyData", fail),), identity=identity)
    else:
        values = doc["keyDatas"]
        if not isinstance(values, list) or not values:
            fail(f"{where}.keyDatas", "must be a non-empty list of base64 strings")
        datas = tuple(_base64(v, f"{where}.keyDatas[{i}]", fail) for i, v in enumerate(values))
        requirement = SigstoreSigned(key_datas=datas, identity=identity)
    if rekor:
        return attrs.evolve(requirement, unsupported=f"sigstoreSigned with {rekor[0]} (Rekor transparency log)")
    return requirement


def parse_requirement(doc: Any, where: str, fail: Fail) -> Requirement:
    if not isinstance(doc, Mapping):
        fail(where, "a requirement must be a JSON object")
    kind = doc.get("type")
    if kind == "insecureAcceptAnything":
        _check_keys(doc, {"type"}, set(), where, fail)
        return InsecureAcceptAnything()
    if kind == "reject":
        _check_keys(doc, {"type"}, set(), where, fail)
        return Reject()
    if kind == "signedBy":
        return _signed_by(doc, where, fail)
    if kind == "sigstoreSigned":
        return _sigstore_signed(doc, where, fail)
    if kind == "signedBaseLayer":
        _check_keys(doc, {"type", "baseLayerIdentity"}, {"baseLayerIdentity"}, where, fail)
        parse_identity(doc["baseLayerIdentity"], f"{where}.baseLayerIdentity", fail)
        return SignedBaseLayer()
    fail(f"{where}.type", f"unknown policy requirement type {kind!r}")


def parse_requirements(doc: Any, where: str, fail: Fail) -> tuple[Requirement, ...]:
    if not isinstance(doc, list):
        fail(where, "must be a list of requirements")
    if not doc:
        fail(where, "the list of requirements must not be empty")
    return tuple(parse_requirement(item, f"{where}[{i}]", fail) for i, item in enumerate(doc))
