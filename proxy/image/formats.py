"""Image formats, pure: media types and annotations, the Go structures of manifests, indexes and configs (as
``proxy.image.gojson`` schemas, so output is byte-identical to the Go server's), and the MIME type of a manifest
guessed the way containers/image guesses it. Errors: ``ManifestError`` only."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from protocol.digests import digest_of
from protocol.errors import ProxyError
from proxy.image import gojson
from proxy.image.gojson import (
    ANY,
    BOOL,
    BYTES,
    INT,
    STRING,
    TIME,
    EmptyStruct,
    Field,
    GoJSONError,
    GoJSONNestingError,
    ListOf,
    MapOf,
    PtrTo,
    Struct,
    go_quote,
)

# ---- media types ---------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_V2S1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V2S1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V2_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_ZSTD = "io.github.containers.compression.zstd"
ANNOTATION_ZSTD_CHUNKED_SENTINEL = "io.github.containers.zstd-chunked.sentinel"

DOCKER_TO_OCI_LAYER = {
    DOCKER_FOREIGN_LAYER: OCI_LAYER_NONDIST,
    DOCKER_FOREIGN_LAYER_GZIP: OCI_LAYER_NONDIST_GZIP,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD,
}

# manifest.SupportedSchema2MediaType
SCHEMA2_MEDIA_TYPES = frozenset(
    {
        DOCKER_V2_LIST,
        DOCKER_V2S1,
        DOCKER_V2S1_SIGNED,
        DOCKER_CONFIG,
        DOCKER_FOREIGN_LAYER,
        DOCKER_FOREIGN_LAYER_GZIP,
        DOCKER_LAYER_GZIP,
        DOCKER_V2S2,
        DOCKER_LAYER,
        DOCKER_LAYER_ZSTD,
    }
)


class ManifestError(ProxyError):
    """A manifest, list or config cannot be used (malformed, unsupported, no matching instance)."""


# ---- Go structures (schemas for proxy.image.gojson) -----------------------------------------------

_S = STRING

OCI_PLATFORM = Struct(
    "Platform",
    (
        Field("architecture", _S),
        Field("os", _S),
        Field("os.version", _S, True),
        Field("os.features", ListOf(_S), True),
        Field("variant", _S, True),
    ),
)
OCI_DESCRIPTOR = Struct(
    "Descriptor",
    (
        Field("mediaType", _S),
        Field("digest", _S),
        Field("size", INT),
        Field("urls", ListOf(_S), True),
        Field("annotations", MapOf(_S), True),
        Field("data", BYTES, True),
        Field("platform", PtrTo(OCI_PLATFORM), True),
        Field("artifactType", _S, True),
    ),
)
OCI_MANIFEST_STRUCT = Struct(
    "Manifest",
    (
        Field("schemaVersion", INT),
        Field("mediaType", _S, True),
        Field("artifactType", _S, True),
        Field("config", OCI_DESCRIPTOR),
        Field("layers", ListOf(OCI_DESCRIPTOR)),
        Field("subject", PtrTo(OCI_DESCRIPTOR), True),
        Field("annotations", MapOf(_S), True),
    ),
)
OCI_INDEX_STRUCT = Struct(
    "Index",
    (
        Field("schemaVersion", INT),
        Field("mediaType", _S, True),
        Field("artifactType", _S, True),
        Field("manifests", ListOf(OCI_DESCRIPTOR)),
        Field("subject", PtrTo(OCI_DESCRIPTOR), True),
        Field("annotations", MapOf(_S), True),
    ),
)
SCHEMA2_DESCRIPTOR = Struct(
    "Schema2Descriptor",
    (
        Field("mediaType", _S),
        Field("size", INT),
        Field("digest", _S),
        Field("urls", ListOf(_S), True),
    ),
)
SCHEMA2_MANIFEST = Struct(
    "Schema2",
    (
        Field("schemaVersion", INT),
        Field("mediaType", _S),
        Field("config", SCHEMA2_DESCRIPTOR),
        Field("layers", ListOf(SCHEMA2_DESCRIPTOR)),
    ),
)
SCHEMA2_PLATFORM = Struct(
    "Schema2PlatformSpec",
    (
        Field("architecture", _S),
        Field("os", _S),
        Field("os.version", _S, True),
        Field("os.features", ListOf(_S), True),
        Field("variant", _S, True),
        Field("features", ListOf(_S), True),
    ),
)
SCHEMA2_LIST = Struct(
    "Schema2List",
    (
        Field("schemaVersion", INT),
        Field("mediaType", _S),
        Field(
            "manifests",
            ListOf(
                Struct("Schema2ManifestDescriptor", (*SCHEMA2_DESCRIPTOR.fields, Field("platform", SCHEMA2_PLATFORM)))
            ),
        ),
    ),
)
OCI_IMAGE_CONFIG = Struct(
    "ImageConfig",
    (
        Field("User", _S, True),
        Field("ExposedPorts", MapOf(EmptyStruct()), True),
        Field("Env", ListOf(_S), True),
        Field("Entrypoint", ListOf(_S), True),
        Field("Cmd", ListOf(_S), True),
        Field("Volumes", MapOf(EmptyStruct()), True),
        Field("WorkingDir", _S, True),
        Field("Labels", MapOf(_S), True),
        Field("StopSignal", _S, True),
        Field("ArgsEscaped", BOOL, True),
    ),
)
OCI_ROOTFS = Struct("RootFS", (Field("type", _S), Field("diff_ids", ListOf(_S))))
OCI_HISTORY = Struct(
    "History",
    (
        Field("created", TIME, True),
        Field("created_by", _S, True),
        Field("author", _S, True),
        Field("comment", _S, True),
        Field("empty_layer", BOOL, True),
    ),
)
OCI_IMAGE = Struct(
    "Image",
    (
        Field("created", TIME, True),
        Field("author", _S, True),
        *OCI_PLATFORM.fields,  # embedded imgspecv1.Platform
        Field("config", OCI_IMAGE_CONFIG, True),  # omitempty never omits a struct
        Field("rootfs", OCI_ROOTFS),
        Field("history", ListOf(OCI_HISTORY), True),
    ),
)

_GUESS_META = Struct("meta", (Field("mediaType", _S), Field("schemaVersion", INT), Field("signatures", ANY)))
_GUESS_OCI = Struct("ociMan", (Field("config", Struct("config", (Field("mediaType", _S),))),))
_GUESS_INDEX = Struct("ociIndex", (Field("manifests", ListOf(OCI_DESCRIPTOR)),))
_DETECTED_FIELDS = Struct(
    "detectedFields",
    tuple(Field(n, ANY) for n in ("config", "fsLayers", "history", "layers", "manifests")),
)

# ---- digests ---------------------------------------------------------------------------------


def manifest_digest(raw: bytes) -> str:
    """``manifest.Digest``: sha256 of the bytes (of the JWS payload for signed schema1)."""
    if guess_mime_type(raw) == DOCKER_V2S1_SIGNED:
        raw = _schema1_payload(raw)
    return digest_of(raw)


def _b64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _schema1_payload(raw: bytes) -> bytes:
    # libtrust pretty signatures: the payload is the document up to formatLength, plus formatTail.
    try:
        doc = gojson.unmarshal(
            raw, Struct("s", (Field("signatures", ListOf(Struct("sig", (Field("protected", _S),)))),))
        )
        sigs = doc["signatures"] or []
        if not sigs:
            raise ManifestError("missing signature key")
        header = gojson.unmarshal(
            _b64url(sigs[0]["protected"]), Struct("h", (Field("formatLength", INT), Field("formatTail", _S)))
        )
        length, tail = header["formatLength"], _b64url(header["formatTail"])
    except (GoJSONError, binascii.Error, ValueError) as e:
        raise ManifestError(f"parsing schema1 signatures: {e}") from None
    if not 0 <= length <= len(raw):
        raise ManifestError("invalid schema1 signature: format length out of range")
    return raw[:length] + tail


# ---- MIME types ------------------------------------------------------------------------------


def too_deep(raw: bytes, what: str, e: GoJSONNestingError) -> ManifestError:
    return ManifestError(f"{what} {digest_of(raw)}: {e}")


def guess_mime_type(raw: bytes) -> str:
    """``manifest.GuessMIMEType``: the recognized MIME type of a manifest blob, or "".

    Unlike Go's, raises ManifestError for a blob nested too deeply to be parsed (Go's "" would make it
    an unknown type and hide why).
    """
    try:
        meta = gojson.unmarshal(raw, _GUESS_META)
    except GoJSONNestingError as e:
        raise too_deep(raw, "manifest", e) from None
    except GoJSONError:
        return ""
    if meta["mediaType"] in (DOCKER_V2S2, DOCKER_V2_LIST, OCI_MANIFEST, OCI_INDEX):
        return meta["mediaType"]
    if meta["schemaVersion"] == 1:
        return DOCKER_V2S1_SIGNED if meta["signatures"] is not None else DOCKER_V2S1
    if meta["schemaVersion"] != 2:
        return ""
    try:
        config_mt = gojson.unmarshal(raw, _GUESS_OCI)["config"]["mediaType"]
    except GoJSONError:
        return ""
    if config_mt == OCI_CONFIG:
        return OCI_MANIFEST
    if config_mt == DOCKER_CONFIG:
        return DOCKER_V2S2
    try:
        manifests = gojson.unmarshal(raw, _GUESS_INDEX)["manifests"]
    except GoJSONError:
        return ""
    if manifests:
        return OCI_INDEX if config_mt == "" else config_mt
    return OCI_MANIFEST


def normalized_mime_type(mime: str) -> str:
    """``manifest.NormalizedMIMEType``: unknown types are treated as signed schema1."""
    if mime in (DOCKER_V2S1, DOCKER_V2S1_SIGNED, OCI_MANIFEST, OCI_INDEX, DOCKER_V2S2, DOCKER_V2_LIST):
        return mime
    return DOCKER_V2S1_SIGNED


def is_list(mime: str) -> bool:
    """``manifest.MIMETypeIsMultiImage``."""
    return mime in (DOCKER_V2_LIST, OCI_INDEX)


def decode(raw: bytes, schema: Struct, what: str) -> dict[str, Any]:
    try:
        return gojson.unmarshal(raw, schema)
    except GoJSONNestingError as e:
        raise too_deep(raw, what, e) from None
    except GoJSONError as e:
        raise ManifestError(f"parsing {what}: {e}") from None


def reject_ambiguous(raw: bytes, mime: str, allowed: tuple[str, ...]) -> None:
    """``ValidateUnambiguousManifestFormat``."""
    fields = decode(raw, _DETECTED_FIELDS, mime)
    unexpected = [n for n, v in fields.items() if v is not None and n not in allowed]
    if unexpected:
        listed = ", ".join(go_quote(n) for n in unexpected)
        raise ManifestError(
            f"rejecting ambiguous manifest, unexpected fields []string{{{listed}}} in supposedly {mime}"
        )
