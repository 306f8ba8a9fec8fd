"""Sigstore signatures made with a public key (cosign's key-based mode), verified with ``cryptography``.

A signature is the payload (a "cosign container image signature" JSON) plus the base64 signature in the
``dev.cosignproject.cosign/signature`` annotation. ECDSA keys (any curve) and RSA (PKCS#1 v1.5) are checked
over SHA-256, Ed25519 over the payload itself, as containers/image does. Certificates (Fulcio) and Rekor
bundles are not checked: a policy that needs them is refused before we get here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from proxy.policy.errors import InvalidSignature

SIGSTORE_PAYLOAD_MIME = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def load_public_keys(data: bytes, what: str) -> list[PublicKey]:
    """Every PEM public key in ``data``; ValueError naming ``what`` when there is none or one is unusable."""
    keys: list[PublicKey] = []
    marker = b"-----BEGIN "
    start = data.find(marker)
    while start != -1:
        end_marker = data.find(b"-----END ", start)
        end = data.find(b"-----", end_marker + 9) + 5 if end_marker != -1 else -1
        if end_marker == -1 or end < 5:
            raise ValueError(f"{what}: truncated PEM block")
        block = data[start:end]
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{what}: not a usable public key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
            raise ValueError(f"{what}: unsupported public key type {type(key).__name__}")
        keys.append(key)
        start = data.find(marker, end)
    if not keys:
        raise ValueError(f"{what}: no PEM public key found")
    return keys


def _verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, payload)
    except CryptoInvalidSignature:
        return False
    return True


def verify_sigstore(mime: str, payload: bytes, annotations: Mapping[str, str], keys: Sequence[PublicKey]) -> None:
    """InvalidSignature unless one of ``keys`` signed ``payload``."""
    if mime != SIGSTORE_PAYLOAD_MIME:
        raise InvalidSignature(f"unexpected MIME type for sigstore signature payload {mime!r}")
    encoded = annotations.get(SIGNATURE_ANNOTATION)
    if not isinstance(encoded, str):
        raise InvalidSignature(f"missing {SIGNATURE_ANNOTATION} annotation")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSignature(f"invalid base64 in the {SIGNATURE_ANNOTATION} annotation") from None
    if not any(_verifies(key, signature, payload) for key in keys):
        raise InvalidSignature("cryptographic signature verification failed: no configured public key verifies it")
