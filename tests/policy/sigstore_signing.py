"""Sigstore (cosign key-based) signatures made with ``cryptography``, stored the way containers/image reads them.

Debian's skopeo 1.9.3 is built with sigstore disabled ("Debian-local change: sigstore disabled": it neither
signs with ``--sign-by-sigstore-private-key`` nor verifies ``sigstoreSigned``), and has no
``generate-sigstore-key``, so these tests make keys and signatures themselves, exactly as cosign lays them
out: the payload is a "cosign container image signature" JSON, the signature (ASN.1 ECDSA over SHA-256,
PKCS#1 v1.5 RSA over SHA-256, or Ed25519 over the payload) goes in the ``dev.cosignproject.cosign/signature``
annotation; in a registry, an OCI manifest tagged ``sha256-<hex>.sig`` whose layers are the payloads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

PAYLOAD_MIME = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def new_key(kind: str = "ecdsa"):
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def payload(manifest_digest: str, identity: str) -> bytes:
    doc = {
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(key, data: bytes) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.sign(data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(data)
    return base64.b64encode(raw).decode()


def write_dir_signature(directory: Path, index: int, key, manifest_digest: str, identity: str) -> None:
    """``signature-<index>`` in containers/image's stored format for a sigstore signature."""
    data = payload(manifest_digest, identity)
    doc = {
        "mimeType": PAYLOAD_MIME,
        "payload": base64.b64encode(data).decode(),
        "annotations": {ANNOTATION: sign(key, data)},
    }
    (directory / f"signature-{index}").write_bytes(b"\x00sigstore-json\n" + json.dumps(doc).encode())


def _push_blob(base: str, repository: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"{base}/v2/{repository}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(start, timeout=10) as response:
        location = urllib.parse.urljoin(base, response.headers["Location"])
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{sep}digest={digest}",
        method="PUT",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=10) as response:
        assert response.status == 201, response.status
    return digest


def push_attachment(base: str, repository: str, manifest_digest: str, signatures: list[tuple[bytes, str]]) -> None:
    """The ``sha256-<hex>.sig`` attachment with one layer per (payload, base64 signature)."""
    config = b'{"architecture":"","os":"","config":{},"rootfs":{"type":"layers","diff_ids":[]}}'
    layers = []
    for data, signature in signatures:
        layers.append(
            {
                "mediaType": PAYLOAD_MIME,
                "digest": _push_blob(base, repository, data),
                "size": len(data),
                "annotations": {ANNOTATION: signature},
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _push_blob(base, repository, config),
            "size": len(config),
        },
        "layers": layers,
    }
    tag = manifest_digest.replace(":", "-") + ".sig"
    put = urllib.request.Request(
        f"{base}/v2/{repository}/manifests/{tag}",
        method="PUT",
        data=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    with urllib.request.urlopen(put, timeout=10) as response:
        assert response.status == 201, response.status
