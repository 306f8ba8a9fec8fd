"""Cosign-format ("ENCRYPTED SIGSTORE PRIVATE KEY") key pairs, made with ``cryptography``.

Debian skopeo 1.9.3 can sign with ``--sign-by-sigstore-private-key`` but has no ``generate-sigstore-key``, so the
tests make the key file themselves: a PKCS#8 private key encrypted the way go-securesystemslib's ``encrypted``
package does it (scrypt, then NaCl secretbox = XSalsa20-Poly1305). ``cryptography`` has scrypt and Poly1305 but
no XSalsa20, so the Salsa20 core is written out below (a test helper: speed does not matter for 200 bytes).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.poly1305 import Poly1305

SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
_MASK = 0xFFFFFFFF


def _rotl(v: int, n: int) -> int:
    return ((v << n) & _MASK) | (v >> (32 - n))


def _salsa_rounds(state: list[int]) -> list[int]:
    x = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11)):  # columns
            x[b] ^= _rotl((x[a] + x[d]) & _MASK, 7)
            x[c] ^= _rotl((x[b] + x[a]) & _MASK, 9)
            x[d] ^= _rotl((x[c] + x[b]) & _MASK, 13)
            x[a] ^= _rotl((x[d] + x[c]) & _MASK, 18)
        for a, b, c, d in ((0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14)):  # rows
            x[b] ^= _rotl((x[a] + x[d]) & _MASK, 7)
            x[c] ^= _rotl((x[b] + x[a]) & _MASK, 9)
            x[d] ^= _rotl((x[c] + x[b]) & _MASK, 13)
            x[a] ^= _rotl((x[d] + x[c]) & _MASK, 18)
    return x


def _state(key: bytes, block16: bytes) -> list[int]:
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", block16)
    sigma = struct.unpack("<4I", b"expand 32-byte k")
    return [sigma[0], *k[:4], sigma[1], *n, sigma[2], *k[4:], sigma[3]]


def _hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    x = _salsa_rounds(_state(key, nonce16))
    return struct.pack("<8I", *(x[i] for i in (0, 5, 10, 15, 6, 7, 8, 9)))


def _salsa20_stream(key: bytes, nonce8: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        state = _state(key, nonce8 + struct.pack("<Q", counter))
        mixed = _salsa_rounds(state)
        out += struct.pack("<16I", *((m + s) & _MASK for m, s in zip(mixed, state, strict=True)))
        counter += 1
    return bytes(out[:length])


def secretbox_seal(message: bytes, nonce: bytes, key: bytes) -> bytes:
    """NaCl ``crypto_secretbox`` (XSalsa20-Poly1305): tag || ciphertext."""
    subkey = _hsalsa20(key, nonce[:16])
    stream = _salsa20_stream(subkey, nonce[16:24], 32 + len(message))
    ciphertext = bytes(a ^ b for a, b in zip(message, stream[32:], strict=True))
    return Poly1305.generate_tag(stream[:32], ciphertext) + ciphertext


def encrypted_private_key_pem(private_key, passphrase: bytes) -> bytes:
    der = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, nonce = os.urandom(32), os.urandom(24)
    key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
    doc = {
        "kdf": {"name": "scrypt", "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(secretbox_seal(der, nonce, key)),
    }
    body = base64.encodebytes(json.dumps(doc).encode()).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
        + b"\n".join(lines)
        + (b"\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_key_pair(directory: Path, name: str = "cosign", kind: str = "ecdsa") -> tuple[Path, Path, Path]:
    """(private key, its passphrase file, public key PEM) in ``directory``."""
    if kind == "ecdsa":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(kind)
    passphrase = b"test-passphrase"
    key_path = directory / f"{name}.key"
    key_path.write_bytes(encrypted_private_key_pem(private, passphrase))
    pass_path = directory / f"{name}.pass"
    pass_path.write_bytes(passphrase)
    pub_path = directory / f"{name}.pub"
    pub_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_path, pass_path, pub_path
