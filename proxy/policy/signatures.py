"""Where an image's signatures are, and reading them (never trusting them: that is the requirements' job).

- ``docker://``: the lookaside storage registries.d names (``BASE/<repo path>@sha256=<hex>/signature-N``,
  N = 1, 2, ... until one is missing; ``file://``, ``http://`` or ``https://``, read through the same
  hardened HTTP client as the registry, but never with the registry's credentials or tokens: only the lookaside
  URL's own ``user:password@``, as Basic auth, to its own origin; a 401 is an error naming the host that sent it),
  then, when ``use-sigstore-attachments`` is on, the layers of the
  ``sha256-<hex>.sig`` attachment manifest in the image's repository.
- ``dir:``: ``signature-N`` (``<hex>.signature-N`` for an instance of a list), in the format containers/image
  writes: raw simple-signing bytes, or ``\\x00simple-signing\\n`` / ``\\x00sigstore-json\\n`` + JSON.
- ``oci:``, ``oci-archive:``, ``docker-archive:``: these formats store no signatures.

A signature that cannot be fetched (a server error, an unreadable file, an unknown format) is an error for
the whole check, as in containers/image: the image is refused with the reason, never accepted.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import trio

from proxy.common import jsonlimits, threads
from proxy.http.connection import Response
from proxy.http.errors import HTTPError
from proxy.http.redirects import request_following_redirects
from proxy.http.url import URL
from proxy.image import manifest as mf
from proxy.image.reference import DockerReference
from proxy.policy.errors import PolicyFileError
from proxy.policy.gpg import MAX_SIGNATURE_SIZE
from proxy.policy.registries_d import RegistriesD
from proxy.registry.auth import answered_elsewhere
from proxy.registry.client import RegistryClient
from proxy.registry.source import RegistrySource
from proxy.sources.base import ImageSource, SourceError
from proxy.sources.dir import DirSource

#: containers/image refuses more lookaside signatures than this as a server error
MAX_LOOKASIDE_SIGNATURES = 128
#: deadline for one lookaside signature over HTTP (connect, headers and body)
LOOKASIDE_TIMEOUT = 60.0
MAX_ATTACHMENT_MANIFEST = 4 << 20


class SignatureFetchError(Exception):
    """Signatures could not be read; the text says where (URLs without credentials)."""


@attrs.frozen
class SimpleSignature:
    blob: bytes
    origin: str


@attrs.frozen
class SigstoreSignature:
    mime: str
    payload: bytes
    annotations: Mapping[str, str]
    origin: str


Signature = SimpleSignature | SigstoreSignature


def redact(url: str) -> str:
    """``url`` without user information, query or fragment: error texts never carry credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_stored_signature(data: bytes, origin: str) -> Signature:
    """containers/image's on-disk signature format (``signature.FromBlob``)."""
    if not data.startswith(b"\x00"):
        return SimpleSignature(data, origin)
    header, newline, rest = data[1:].partition(b"\n")
    if not newline:
        raise SignatureFetchError(f"{origin}: invalid signature format, missing format name")
    if header == b"simple-signing":
        return SimpleSignature(rest, origin)
    if header == b"sigstore-json":
        try:
            doc = jsonlimits.loads(rest)
            mime = doc["mimeType"]
            payload = base64.b64decode(doc["payload"], validate=True)
            annotations = doc.get("annotations") or {}
            if not isinstance(mime, str) or not isinstance(annotations, dict):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise SignatureFetchError(f"{origin}: invalid sigstore signature: {e}") from None
        return SigstoreSignature(mime, payload, {str(k): str(v) for k, v in annotations.items()}, origin)
    raise SignatureFetchError(f"{origin}: unrecognized signature format {header.decode('utf-8', 'replace')!r}")


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SignatureFetchError(f"reading signature {path}: {(e.strerror or str(e)).lower()}") from None
    if len(data) > MAX_SIGNATURE_SIZE:
        raise SignatureFetchError(f"signature {path} is larger than {MAX_SIGNATURE_SIZE} bytes")
    return data


def _unauthorized(response: Response, url: str, username: str | None) -> str:
    """Why a lookaside server's 401 is final: it names who answered; its challenge is not answered (registry
    credentials never go to a lookaside server, whatever realm it names)."""
    lookaside = URL.parse(url)
    who = answered_elsewhere(response, lookaside.origin, lookaside.authority) or lookaside.authority
    if username is not None and who == lookaside.authority:
        return f"{who} answered 401 Unauthorized to the credentials in the lookaside URL"
    return (
        f"{who} answered 401 Unauthorized; registry credentials are never sent to a lookaside server "
        "(give it its own as user:password@ in the lookaside URL)"
    )


class SignatureReader:
    """The signatures of one opened image, read once per manifest digest."""

    def __init__(
        self,
        source: ImageSource,
        docker_reference: DockerReference | None,
        registry: RegistryClient | None,
        registries_d: RegistriesD | None,
        registries_d_error: str | None,
    ) -> None:
        self._source = source
        self._docker_reference = docker_reference
        self._registry = registry
        self._registries_d = registries_d
        self._registries_d_error = registries_d_error
        self._cache: dict[str, list[Signature]] = {}

    async def signatures(self, manifest_digest: str, instance: bool) -> list[Signature]:
        """Every signature stored for the manifest with that digest (``instance``: a list's instance)."""
        if manifest_digest not in self._cache:
            self._cache[manifest_digest] = await self._read(manifest_digest, instance)
        return self._cache[manifest_digest]

    async def _read(self, digest: str, instance: bool) -> list[Signature]:
        if not mf.is_valid_digest(digest):
            raise SignatureFetchError(f"invalid manifest digest {digest!r}")
        if isinstance(self._source, RegistrySource):
            return await self._registry_signatures(self._source, digest)
        if isinstance(self._source, DirSource):
            return await threads.run_sync(self._dir_signatures, self._source, digest, instance)
        return []

    # ------------------------------------------------------------------ dir:

    @staticmethod
    def _dir_signatures(source: DirSource, digest: str, instance: bool) -> list[Signature]:
        """The ``signature-N`` files of a ``dir:`` image, read from its opened directory as the client."""
        root = source.root
        prefix = digest.partition(":")[2] + "." if instance else ""
        found: list[Signature] = []
        for n in range(1, MAX_LOOKASIDE_SIGNATURES + 2):
            name = f"{prefix}signature-{n}"
            path = os.path.join(root, name)
            try:
                data = source.read_file(name, MAX_SIGNATURE_SIZE)
            except FileNotFoundError:
                return found
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return found
                raise SignatureFetchError(f"reading signature {path}: {(e.strerror or str(e)).lower()}") from None
            if n > MAX_LOOKASIDE_SIGNATURES:
                raise SignatureFetchError(f"{root}: more than {MAX_LOOKASIDE_SIGNATURES} signatures")
            found.append(parse_stored_signature(data, path))
        return found

    # ------------------------------------------------------------------ docker://

    async def _registry_signatures(self, source: RegistrySource, digest: str) -> list[Signature]:
        if self._registry is None:
            self._registry = source.client  # the session's client: its pool, never its credentials
        if self._registries_d_error is not None:
            raise SignatureFetchError(self._registries_d_error)
        ref = self._docker_reference
        config = self._registries_d or RegistriesD()
        if ref is None:  # pragma: no cover - a docker source always has a reference
            raise SignatureFetchError("no Docker reference for a docker:// image")
        found: list[Signature] = list(await self._lookaside(config.lookaside_base(ref), digest))
        if config.use_sigstore_attachments(ref):
            found += await self._attachments(source, digest)
        return found

    async def _lookaside(self, base: str, digest: str) -> list[Signature]:
        algorithm, _, hex_ = digest.partition(":")
        scheme = urlsplit(base).scheme
        if scheme not in ("file", "http", "https"):
            raise SignatureFetchError(f"unsupported scheme when reading signatures from {redact(base)}")
        found: list[Signature] = []
        for n in range(1, MAX_LOOKASIDE_SIGNATURES + 2):
            url = f"{base}@{algorithm}={hex_}/signature-{n}"
            if n > MAX_LOOKASIDE_SIGNATURES:
                raise SignatureFetchError(
                    f"{redact(base)}: more than {MAX_LOOKASIDE_SIGNATURES} signatures, assuming a server error"
                )
            if scheme == "file":
                data = await threads.run_sync(_read_file, unquote(urlsplit(url).path))
            else:
                data = await self._http_signature(url)
            if data is None:
                return found
            found.append(parse_stored_signature(data, redact(url)))
        return found

    async def _http_signature(self, url: str) -> bytes | None:
        if self._registry is None:
            raise SignatureFetchError(f"cannot read {redact(url)}: no HTTP client in this context")
        headers = [("User-Agent", self._registry.settings.user_agent), ("Accept-Encoding", "identity")]
        parts = urlsplit(url)
        if parts.username is not None:
            # user:password@ in a lookaside URL is HTTP basic auth (as Go's client sends it); the URL the
            # HTTP client (and any error text) sees carries no credentials
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers.append(("Authorization", "Basic " + base64.b64encode(user_pass).decode()))
        url = redact(url)
        try:
            with trio.fail_after(LOOKASIDE_TIMEOUT):
                # the pool is the registry client's, but nothing of the registry's authorization comes along:
                # requests through the pool carry only the headers given here
                response = await request_following_redirects(self._registry.pool, "GET", url, headers)
                async with response:
                    if response.status == 404:
                        return None
                    if response.status == 401:
                        raise SignatureFetchError(
                            f"reading signature from {redact(url)}: {_unauthorized(response, url, parts.username)}"
                        )
                    if response.status != 200:
                        raise SignatureFetchError(
                            f"reading signature from {redact(url)}: status {response.status} ({response.reason})"
                        )
                    return await response.read_all(MAX_SIGNATURE_SIZE)
        except trio.TooSlowError:
            raise SignatureFetchError(
                f"reading signature from {redact(url)}: no answer within {LOOKASIDE_TIMEOUT:.0f} s"
            ) from None
        except HTTPError as e:
            raise SignatureFetchError(f"reading signature from {redact(url)}: {e}") from None

    async def _attachments(self, source: RegistrySource, digest: str) -> list[Signature]:
        tag = digest.replace(":", "-", 1) + ".sig"
        try:
            found = await source.get_tagged_manifest(tag)
        except SourceError as e:
            raise SignatureFetchError(f"reading sigstore attachment {tag}: {e}") from None
        if found is None:
            return []
        raw, mime = found
        if mime != mf.OCI_MANIFEST:
            raise SignatureFetchError(f"unexpected MIME type for sigstore attachment manifest {tag}: {mime!r}")
        try:
            layers = jsonlimits.loads(raw).get("layers") or []
        except (ValueError, AttributeError):
            raise SignatureFetchError(f"sigstore attachment manifest {tag} is not valid JSON") from None
        signatures: list[Signature] = []
        for layer in layers:
            if not isinstance(layer, dict) or not mf.is_valid_digest(layer.get("digest")):
                raise SignatureFetchError(f"sigstore attachment manifest {tag}: invalid layer descriptor")
            size = layer.get("size")
            if not isinstance(size, int) or not 0 <= size <= MAX_SIGNATURE_SIZE:
                raise SignatureFetchError(f"sigstore attachment {layer['digest']}: size {size!r} is not acceptable")
            payload = await self._blob(source, layer["digest"], size)
            annotations = layer.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise SignatureFetchError(f"sigstore attachment {layer['digest']}: invalid annotations")
            signatures.append(
                SigstoreSignature(
                    str(layer.get("mediaType", "")),
                    payload,
                    {str(k): str(v) for k, v in annotations.items()},
                    f"{source.reference} attachment {tag} layer {layer['digest']}",
                )
            )
        return signatures

    @staticmethod
    async def _blob(source: RegistrySource, digest: str, size: int) -> bytes:
        try:
            blob = await source.open_blob(digest)
            chunks = []
            total = 0
            async with blob:
                while chunk := await blob.read(1 << 16):
                    total += len(chunk)
                    if total > size:
                        break
                    chunks.append(chunk)
        except SourceError as e:
            raise SignatureFetchError(f"reading sigstore attachment {digest}: {e}") from None
        data = b"".join(chunks)
        if len(data) != size or mf.digest_of(data, digest.partition(":")[0]) != digest:
            raise SignatureFetchError(f"sigstore attachment {digest} does not match its descriptor")
        return data


__all__ = [
    "PolicyFileError",
    "Signature",
    "SignatureFetchError",
    "SignatureReader",
    "SigstoreSignature",
    "SimpleSignature",
    "parse_stored_signature",
    "redact",
]
