"""Deciding whether OpenImage may open an image: the policy's requirements against the image's signatures.

As containers/image's ``IsRunningImageAllowed``: every requirement of the scope that matches must accept the
image (the first that refuses decides the error). ``signedBy`` / ``sigstoreSigned`` accept when at least one
signature verifies with a configured key, signs this manifest's digest and claims an identity the
``signedIdentity`` rule accepts. With ``--require-signed``, an image that passes only requirements that verify
nothing (``insecureAcceptAnything``) is refused.

Manifest lists: the image is accepted if the list passes, or else the instance chosen for this platform
passes (the rule of the newest upstream proxy). Signatures are read only when a requirement needs them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from proxy.common import threads
from proxy.image import manifest as mf
from proxy.image.reference import parse_docker_reference
from proxy.policy.errors import InvalidSignature, PolicyFileError, PolicyRejected
from proxy.policy.gpg import KeyProblem, dearmor, verify_simple_signing
from proxy.policy.payload import COSIGN_TYPE, SIMPLE_SIGNING_TYPE, SignedClaims, parse_payload
from proxy.policy.policy_file import Policy, default_policy_path, load_policy
from proxy.policy.registries_d import RegistriesD, load_registries_d, registries_d_dir
from proxy.policy.requirements import (
    InsecureAcceptAnything,
    Reject,
    Requirement,
    SignedBaseLayer,
    SignedBy,
    SigstoreSigned,
)
from proxy.policy.scopes import ImageScope, image_scope

if TYPE_CHECKING:
    # cryptography costs about 12 ms at start-up: imported where a sigstoreSigned requirement is checked
    from proxy.policy.signatures import Signature, SignatureReader
    from proxy.policy.sigstore import PublicKey
    from proxy.registry.client import RegistryClient
    from proxy.sources.base import ImageSource

log = logging.getLogger(__name__)

MAX_KEY_FILE_SIZE = 1 << 20
INSECURE_POLICY = Policy("--insecure-policy", (InsecureAcceptAnything(),))


class _Refused(Exception):
    """One requirement refuses one manifest; the text says why."""


@attrs.frozen
class _Manifest:
    """One manifest being checked: the top level, or the instance chosen from a list."""

    raw: bytes
    digest: str
    is_instance: bool


@attrs.frozen
class ImagePolicy:
    """The signature policy OpenImage enforces, as the flags and files configured it.

    ``error`` is set when the policy (or registries.d) could not be read: every open then fails with it.
    """

    policy: Policy | None
    error: str | None = None
    require_signed: bool = False
    registries_d: RegistriesD | None = None
    registries_d_error: str | None = None

    @classmethod
    def from_flags(
        cls,
        policy_path: str | None = None,
        insecure: bool = False,
        require_signed: bool = False,
        registries_d: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ImagePolicy:
        """``--policy``, ``--insecure-policy``, ``--require-signed``, ``--registries.d`` (skopeo's rules)."""
        environ = os.environ if environ is None else environ
        lookaside: RegistriesD | None = None
        lookaside_error: str | None = None
        try:
            lookaside = load_registries_d(registries_d_dir(registries_d, environ))
        except PolicyFileError as e:
            lookaside_error = str(e)
        common = {"require_signed": require_signed, "registries_d": lookaside, "registries_d_error": lookaside_error}
        if insecure:
            return cls(INSECURE_POLICY, **common)
        try:
            policy = load_policy(policy_path or default_policy_path(environ))
        except PolicyFileError as e:
            return cls(None, error=str(e), **common)
        return cls(policy, **common)

    @classmethod
    def system_default(cls) -> ImagePolicy:
        return cls.from_flags()

    @property
    def enforces_anything(self) -> bool:
        return self.policy is not INSECURE_POLICY or self.require_signed

    async def check(
        self,
        reference: str,
        source: ImageSource,
        top: bytes,
        instance: tuple[str, bytes] | None = None,
        registry: RegistryClient | None = None,
    ) -> None:
        """Refuse (PolicyRejected) unless the policy accepts the image ``reference`` whose top-level manifest
        is ``top`` and, for a list, whose chosen instance is ``instance`` (digest, bytes)."""
        if self.policy is None:
            raise PolicyRejected(self.error or "no signature policy")
        scope = image_scope(reference, source.local_path)
        scope_name, requirements = self.policy.requirements_for(scope)

        def reader() -> SignatureReader:
            # imported when a requirement needs signatures: the reader brings the registry and HTTP stack, 20 ms
            # of every spawned proxy's start-up otherwise (-X importtime), for images no signature is asked of
            from proxy.policy.signatures import SignatureReader

            return SignatureReader(source, scope.docker_reference, registry, self.registries_d, self.registries_d_error)

        checker = _Checker(scope, requirements, reader, self.require_signed)
        where = f"{reference}: rejected by signature policy {self.policy.path}, scope {scope_name}"
        if source.local_path is not None and source.local_path not in reference:
            where += f" (the path opened is {source.local_path})"
        top_manifest = _Manifest(top, mf.manifest_digest(top), is_instance=False)
        try:
            await checker.allows(top_manifest)
            return
        except _Refused as e:
            if instance is None:
                raise PolicyRejected(f"{where}: {e}") from None
            list_reason = str(e)
        digest, raw = instance
        try:
            await checker.allows(_Manifest(raw, digest, is_instance=True))
        except _Refused as e:
            raise PolicyRejected(
                f"{where}: neither the manifest list nor its instance {digest} for this platform is accepted: "
                f"list: {list_reason}; instance: {e}"
            ) from None
        log.debug("%s: the manifest list is not accepted (%s), its instance %s is", reference, list_reason, digest)


class _Checker:
    def __init__(
        self,
        scope: ImageScope,
        requirements: tuple[Requirement, ...],
        reader: Callable[[], SignatureReader],
        require_signed: bool,
    ) -> None:
        self.scope = scope
        self.requirements = requirements
        self._make_reader = reader
        self._reader: SignatureReader | None = None
        self.require_signed = require_signed

    async def allows(self, manifest: _Manifest) -> None:
        for requirement in self.requirements:
            await self._requirement(requirement, manifest)
        if self.require_signed and not any(r.verifies_signatures for r in self.requirements):
            raise _Refused("--require-signed: the policy would accept this image without verifying any signature")

    async def _requirement(self, requirement: Requirement, manifest: _Manifest) -> None:
        if isinstance(requirement, InsecureAcceptAnything):
            return
        if isinstance(requirement, Reject):
            raise _Refused('the policy requirement is "reject"')
        if isinstance(requirement, SignedBaseLayer):
            raise _Refused("signedBaseLayer is not supported (containers/image does not implement it either)")
        if isinstance(requirement, SignedBy):
            await self._signed_by(requirement, manifest)
            return
        if isinstance(requirement, SigstoreSigned):
            await self._sigstore_signed(requirement, manifest)
            return
        raise _Refused(f"unsupported policy requirement {requirement.type!r}")  # pragma: no cover

    async def _signatures(self, manifest: _Manifest) -> list[Signature]:
        from proxy.policy.signatures import SignatureFetchError

        try:
            if self._reader is None:
                self._reader = self._make_reader()
            return await self._reader.signatures(manifest.digest, manifest.is_instance)
        except SignatureFetchError as e:
            raise _Refused(f"reading signatures: {e}") from None

    @staticmethod
    def _summary(reasons: list[str]) -> str:
        if len(reasons) == 1:
            return reasons[0]
        return "none of the signatures were accepted, reasons: " + "; ".join(reasons)

    def _claims_match(self, claims: SignedClaims, manifest: _Manifest, requirement: SignedBy | SigstoreSigned) -> None:
        algorithm = claims.manifest_digest.partition(":")[0]
        actual = mf.manifest_digest(manifest.raw) if algorithm == "sha256" else mf.digest_of(manifest.raw, algorithm)
        if actual != claims.manifest_digest:
            raise InvalidSignature(f"signature for docker digest {claims.manifest_digest!r} does not match")
        try:
            signed = parse_docker_reference(claims.docker_reference)
        except ValueError as e:
            raise InvalidSignature(f"invalid docker reference {claims.docker_reference!r} in signature: {e}") from None
        if not requirement.identity.matches(self.scope.docker_reference, signed):
            raise InvalidSignature(
                f"signature for identity {claims.docker_reference!r} is not accepted "
                f"(signedIdentity {requirement.identity.describe()})"
            )

    # ------------------------------------------------------------------ signedBy

    async def _signed_by(self, requirement: SignedBy, manifest: _Manifest) -> None:
        if requirement.key_type != "GPGKeys":
            raise _Refused(f"signedBy with keyType {requirement.key_type!r} is not supported")
        keyring = await threads.run_sync(_gpg_keyring, requirement)
        signatures = await self._signatures(manifest)
        from proxy.policy.signatures import SimpleSignature  # loaded by _signatures

        simple = [s for s in signatures if isinstance(s, SimpleSignature)]
        if not simple:
            raise _Refused(_none_found(len(signatures)))
        reasons = []
        for signature in simple:
            try:
                verified = await verify_simple_signing(signature.blob, keyring)
                claims = parse_payload(verified.payload, SIMPLE_SIGNING_TYPE)
                self._claims_match(claims, manifest, requirement)
            except InvalidSignature as e:
                reasons.append(f"{signature.origin}: {e}")
                continue
            except KeyProblem as e:
                raise _Refused(str(e)) from None
            log.debug("%s accepted: signed by %s", signature.origin, verified.fingerprint)
            return
        raise _Refused(self._summary(reasons))

    # ------------------------------------------------------------------ sigstoreSigned

    async def _sigstore_signed(self, requirement: SigstoreSigned, manifest: _Manifest) -> None:
        if requirement.unsupported is not None:
            raise _Refused(f"{requirement.unsupported} is not supported by image-proxy")
        from proxy.policy.signatures import SigstoreSignature
        from proxy.policy.sigstore import verify_sigstore

        keys = await threads.run_sync(_sigstore_keys, requirement)
        signatures = await self._signatures(manifest)
        sigstore = [s for s in signatures if isinstance(s, SigstoreSignature)]
        if not sigstore:
            raise _Refused(_none_found(len(signatures), sigstore=True))
        reasons = []
        for signature in sigstore:
            try:
                verify_sigstore(signature.mime, signature.payload, signature.annotations, keys)
                claims = parse_payload(signature.payload, COSIGN_TYPE)
                self._claims_match(claims, manifest, requirement)
            except InvalidSignature as e:
                reasons.append(f"{signature.origin}: {e}")
                continue
            log.debug("%s accepted", signature.origin)
            return
        raise _Refused(self._summary(reasons))


def _none_found(other: int, sigstore: bool = False) -> str:
    text = "a signature was required, but no signature exists"
    if other:
        kind = "non-sigstore" if sigstore else "non-simple-signing"
        text += f" ({other} {kind} signatures found)"
    return text


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as e:
        raise _Refused(f"reading key file {path}: {(e.strerror or str(e)).lower()}") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise _Refused(f"key file {path} is larger than {MAX_KEY_FILE_SIZE} bytes")
    return data


def _gpg_keyring(requirement: SignedBy) -> bytes:
    sources = [(path, _read_key_file(path)) for path in requirement.key_paths]
    if requirement.key_data is not None:
        sources.append(("keyData", requirement.key_data))
    try:
        keyring = b"".join(dearmor(data, what) for what, data in sources)
    except KeyProblem as e:
        raise _Refused(str(e)) from None
    if not keyring:
        raise _Refused("no public keys imported")
    return keyring


def _sigstore_keys(requirement: SigstoreSigned) -> list[PublicKey]:
    from proxy.policy.sigstore import load_public_keys

    sources = [(path, _read_key_file(path)) for path in requirement.key_paths]
    sources += [(f"keyData[{i}]", data) for i, data in enumerate(requirement.key_datas)]
    keys: list[PublicKey] = []
    for what, data in sources:
        try:
            keys += load_public_keys(data, what)
        except ValueError as e:
            raise _Refused(str(e)) from None
    return keys
