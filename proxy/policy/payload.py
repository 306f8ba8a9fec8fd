"""The JSON a signature signs: which manifest digest, under which Docker reference.

Simple signing (GPG) calls it an "atomic container signature", sigstore a "cosign container image signature";
the ``critical`` part is the same and parsed as strictly as containers/image does (exactly these keys).
"""

from __future__ import annotations

from typing import Any

import attrs

from proxy.common import jsonlimits
from proxy.image import manifest as mf
from proxy.policy.errors import InvalidSignature

SIMPLE_SIGNING_TYPE = "atomic container signature"
COSIGN_TYPE = "cosign container image signature"


@attrs.frozen
class SignedClaims:
    manifest_digest: str
    docker_reference: str


def _exact(obj: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidSignature(f"{what} is not a JSON object")
    if set(obj) != keys:
        extra = sorted(set(obj) - keys)
        missing = sorted(keys - set(obj))
        raise InvalidSignature(f"{what}: unexpected keys {extra} / missing keys {missing}")
    return obj


def parse_payload(data: bytes, expected_type: str) -> SignedClaims:
    """The claims of a verified payload; InvalidSignature if it is not exactly what a signature must say."""
    try:
        doc = jsonlimits.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidSignature(f"invalid signature payload: {e}") from None
    if not isinstance(doc, dict) or "critical" not in doc:
        raise InvalidSignature("invalid signature payload: no critical section")
    for key in doc:
        if key not in ("critical", "optional"):
            raise InvalidSignature(f"invalid signature payload: unexpected key {key!r}")
    critical = _exact(doc["critical"], {"type", "image", "identity"}, "signature payload critical")
    if critical["type"] != expected_type:
        raise InvalidSignature(f"unrecognized signature type {critical['type']!r} (expected {expected_type!r})")
    image = _exact(critical["image"], {"docker-manifest-digest"}, "signature payload critical.image")
    identity = _exact(critical["identity"], {"docker-reference"}, "signature payload critical.identity")
    digest = image["docker-manifest-digest"]
    reference = identity["docker-reference"]
    if not isinstance(digest, str) or not mf.is_valid_digest(digest):
        raise InvalidSignature(f"invalid docker-manifest-digest {digest!r} in signature")
    if not isinstance(reference, str):
        raise InvalidSignature("invalid docker-reference in signature")
    optional = doc.get("optional")
    if optional is not None and not isinstance(optional, dict):
        raise InvalidSignature("signature payload optional section is not a JSON object")
    return SignedClaims(digest, reference)
