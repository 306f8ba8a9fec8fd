"""GPG simple signing: checking a signature with the system's ``gpgv`` against the policy's keys only.

Each check runs ``gpgv`` in a fresh temporary GNUPGHOME whose only keyring holds the trusted keys (armored
keys are de-armored here first: gpgv reads binary keyrings), so nothing of the user's or the system's GnuPG
state counts. The signature is accepted only when gpgv exits 0 and its status lines show exactly one signature,
GOODSIG and VALIDSIG, and none of BADSIG, ERRSIG, EXPSIG, EXPKEYSIG, REVKEYSIG.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import subprocess
import tempfile

import attrs
import trio

from proxy.policy.errors import InvalidSignature

#: how long one gpgv run may take
GPGV_TIMEOUT = 30.0
#: the largest signature and payload accepted (containers/image's limit)
MAX_SIGNATURE_SIZE = 4 << 20

_BAD_STATUSES = ("BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY")


class KeyProblem(Exception):
    """The configured keys cannot be used."""


@attrs.frozen
class Verified:
    payload: bytes
    fingerprint: str


def dearmor(data: bytes, what: str) -> bytes:
    """Binary OpenPGP packets from ``data``: ASCII-armored blocks are decoded, anything else is kept."""
    if b"-----BEGIN PGP" not in data:
        return data
    out = bytearray()
    lines = data.decode("ascii", "replace").splitlines()
    i = 0
    blocks = 0
    while i < len(lines):
        if not lines[i].startswith("-----BEGIN PGP"):
            i += 1
            continue
        i += 1
        while i < len(lines) and ":" in lines[i]:  # armor headers
            i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("-----END PGP"):
            line = lines[i].strip()
            if line and not (line.startswith("=") and len(line) == 5):
                body.append(line)
            i += 1
        try:
            out += base64.b64decode("".join(body), validate=True)
        except (binascii.Error, ValueError):
            raise KeyProblem(f"{what}: invalid ASCII-armored key data") from None
        blocks += 1
    if not blocks:
        raise KeyProblem(f"{what}: no key block found")
    return bytes(out)


def _gpgv() -> str:
    path = shutil.which("gpgv")
    if path is None:
        raise KeyProblem("cannot verify GPG signatures: gpgv is not installed (Debian package gpgv)")
    return path


def _parse_status(text: str) -> tuple[str | None, list[str]]:
    """(primary key fingerprint of the one good signature or None, the problems seen)."""
    newsig = goodsig = 0
    fingerprint: str | None = None
    problems = []
    for line in text.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        words = line[9:].split()
        if not words:
            continue
        keyword = words[0]
        if keyword == "NEWSIG":
            newsig += 1
        elif keyword == "GOODSIG":
            goodsig += 1
        elif keyword == "VALIDSIG" and len(words) >= 2:
            fingerprint = words[-1] if len(words) >= 11 else words[1]
        elif keyword in _BAD_STATUSES:
            problems.append(" ".join(words[:2]))
    if newsig != 1:
        problems.append(f"unexpected GPG signature count {newsig}")
    if goodsig != 1 or fingerprint is None:
        problems.append("no good signature by a trusted key")
    return (fingerprint if not problems else None), problems


async def _run_gpgv(signature: bytes, keyring: bytes) -> Verified:
    """gpgv as a trio child process: cancelling the open (Shutdown, a client gone) kills it at once."""
    gpgv = _gpgv()
    with tempfile.TemporaryDirectory(prefix="image-proxy-gpg-") as home:
        os.chmod(home, 0o700)
        keyring_path = os.path.join(home, "trusted.gpg")
        signature_path = os.path.join(home, "signature")
        output_path = os.path.join(home, "payload")
        with open(keyring_path, "wb") as f:
            f.write(keyring)
        with open(signature_path, "wb") as f:
            f.write(signature)
        env = {"GNUPGHOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        command = [
            gpgv,
            "--homedir",
            home,
            "--status-fd",
            "1",
            "--keyring",
            keyring_path,
            "--output",
            output_path,
            signature_path,
        ]
        done = None
        with trio.move_on_after(GPGV_TIMEOUT):
            done = await trio.run_process(
                command,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                env=env,
                check=False,
            )
        if done is None:
            raise InvalidSignature(f"gpgv did not finish within {GPGV_TIMEOUT:.0f} s")
        status = done.stdout.decode("utf-8", "replace")
        fingerprint, problems = _parse_status(status)
        if done.returncode != 0 or fingerprint is None:
            detail = "; ".join(problems) or done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise InvalidSignature(f"invalid GPG signature: {detail}")
        with open(output_path, "rb") as f:
            payload = f.read(MAX_SIGNATURE_SIZE + 1)
        if len(payload) > MAX_SIGNATURE_SIZE:
            raise InvalidSignature("signed payload too large")
        return Verified(payload, fingerprint)


async def verify_simple_signing(signature: bytes, keyring: bytes) -> Verified:
    """The payload a signature signs and the signer's fingerprint; InvalidSignature when it does not verify
    with ``keyring`` (binary OpenPGP keys); KeyProblem when gpgv is missing."""
    if len(signature) > MAX_SIGNATURE_SIZE:
        raise InvalidSignature("signature too large")
    return await _run_gpgv(signature, keyring)
