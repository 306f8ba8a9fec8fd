"""``signedIdentity``: which Docker reference a signature must claim for an image (containers-policy.json(5)).

A rule compares the image's own Docker reference (None for transports that have none, such as ``dir:``)
with the identity written in the signature. The rules and what they accept:

- ``matchRepoDigestOrExact`` (the default of ``signedBy``): an image named by digest needs a signature for the
  same repository; an image named by tag needs a signature for exactly that tag.
- ``matchRepository``: the same repository, whatever the tag. ``matchExact``: the same tag.
- ``exactReference`` / ``exactRepository``: a fixed reference / repository, whatever the image is called.
- ``remapIdentity``: the image's name with ``prefix`` replaced by ``signedPrefix``, then as
  ``matchRepoDigestOrExact``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from proxy.image.reference import DockerReference, parse_docker_reference

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
#: what ``remapIdentity`` accepts as a prefix: host[:port], host[:port]/namespace..., host[:port]/namespace/repo
_REMAP_PREFIX_RE = re.compile(
    rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?(?:/{_PATH_COMPONENT})*", re.ASCII
)


def _name_only(ref: DockerReference) -> bool:
    return ref.tag is None and ref.digest is None


def _repo_digest_or_exact(intended: DockerReference, signed: DockerReference) -> bool:
    if intended.digest is not None:
        return signed.name == intended.name
    if intended.tag is not None:
        return not _name_only(signed) and str(signed) == str(intended)
    return False


@attrs.frozen
class IdentityRule:
    """One ``signedIdentity`` rule; ``type`` is its name in policy.json."""

    type: str
    #: exactReference: the reference; exactRepository: the repository
    reference: DockerReference | None = None
    prefix: str = ""
    signed_prefix: str = ""

    def matches(self, image: DockerReference | None, signed: DockerReference) -> bool:
        """Whether a signature claiming ``signed`` may vouch for ``image`` (None: an image without a Docker
        reference, which only ``exactReference`` and ``exactRepository`` can accept)."""
        if self.type == "exactReference":
            assert self.reference is not None
            return not _name_only(signed) and str(signed) == str(self.reference)
        if self.type == "exactRepository":
            assert self.reference is not None
            return signed.name == self.reference.name
        if image is None:
            return False
        if self.type == "matchExact":
            return not _name_only(image) and not _name_only(signed) and str(signed) == str(image)
        if self.type == "matchRepository":
            return signed.name == image.name
        if self.type == "matchRepoDigestOrExact":
            return _repo_digest_or_exact(image, signed)
        if self.type == "remapIdentity":
            remapped = self._remap(image)
            return remapped is not None and _repo_digest_or_exact(remapped, signed)
        raise AssertionError(self.type)  # parse_identity admits no other type

    def _remap(self, image: DockerReference) -> DockerReference | None:
        text = str(image)
        if not _matches_prefix(text, self.prefix):
            return image
        try:
            return parse_docker_reference(self.signed_prefix + text[len(self.prefix) :])
        except ValueError:
            return None

    def describe(self) -> str:
        if self.type == "exactReference":
            return f"exactReference {self.reference}"
        if self.type == "exactRepository":
            return f"exactRepository {self.reference.name if self.reference else ''}"
        if self.type == "remapIdentity":
            return f"remapIdentity {self.prefix} -> {self.signed_prefix}"
        return self.type


def _matches_prefix(ref: str, prefix: str) -> bool:
    if len(ref) < len(prefix) or not ref.startswith(prefix):
        return False
    return len(ref) == len(prefix) or ref[len(prefix)] in ":/@"


DEFAULT_IDENTITY = IdentityRule("matchRepoDigestOrExact")

_SIMPLE_RULES = ("matchExact", "matchRepoDigestOrExact", "matchRepository")


def parse_identity(doc: Any, where: str, fail) -> IdentityRule:
    """A ``signedIdentity`` object; ``fail(key, why)`` raises the policy file's error."""
    if not isinstance(doc, Mapping):
        fail(where, "must be a JSON object")
    kind = doc.get("type")
    if kind in _SIMPLE_RULES:
        _exact_keys(doc, {"type"}, where, fail)
        return IdentityRule(kind)
    if kind == "exactReference":
        _exact_keys(doc, {"type", "dockerReference"}, where, fail)
        ref = _reference(doc["dockerReference"], f"{where}.dockerReference", fail)
        if _name_only(ref):
            fail(f"{where}.dockerReference", f"{doc['dockerReference']!r} contains neither a tag nor a digest")
        return IdentityRule(kind, reference=ref)
    if kind == "exactRepository":
        _exact_keys(doc, {"type", "dockerRepository"}, where, fail)
        ref = _reference(doc["dockerRepository"], f"{where}.dockerRepository", fail)
        return IdentityRule(kind, reference=ref)
    if kind == "remapIdentity":
        _exact_keys(doc, {"type", "prefix", "signedPrefix"}, where, fail)
        for key in ("prefix", "signedPrefix"):
            value = doc[key]
            if not isinstance(value, str) or not _REMAP_PREFIX_RE.fullmatch(value):
                fail(f"{where}.{key}", f"{value!r} is not a host[:port][/namespace...] prefix")
        return IdentityRule(kind, prefix=doc["prefix"], signed_prefix=doc["signedPrefix"])
    fail(f"{where}.type", f"unknown policy reference match type {kind!r}")
    raise AssertionError("unreachable")


def _reference(value: Any, where: str, fail) -> DockerReference:
    if not isinstance(value, str):
        fail(where, "must be a string")
    try:
        return parse_docker_reference(value)
    except ValueError as e:
        fail(where, f"{value!r}: {e}")
        raise AssertionError("unreachable") from None


def _exact_keys(doc: Mapping[str, Any], keys: set[str], where: str, fail) -> None:
    for key in doc:
        if key not in keys:
            fail(f"{where}.{key}", "unknown key")
    for key in sorted(keys - set(doc)):
        fail(f"{where}.{key}", "missing")
