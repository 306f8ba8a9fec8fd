"""Manifests the way containers/image handles them for the proxy.

Everything here is pure (bytes in, bytes/values out): MIME type guessing, manifest-list
instance selection for the wanted platform, parsing and validation of image manifests, the
Docker schema2 -> OCI conversion and the OCI config re-serialization that GetManifest,
GetConfig, GetFullConfig and GetLayerInfo return. The Go structures are mirrored as
``proxy.image.gojson`` schemas so that the output is byte-identical to what the Go server writes.

Errors: ``ManifestError`` only, whatever the bytes. A document nested deeper than
``proxy.common.jsonlimits.MAX_DEPTH`` is refused naming it by digest:
``OCI image manifest sha256:…: JSON nested too deeply (over 64 levels)``.
"""

from __future__ import annotations

import base64
import binascii
import platform as _host
import sys
from typing import Any

import attrs

from protocol.digests import digest_of, is_valid_digest
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

_DOCKER_TO_OCI_LAYER = {
    DOCKER_FOREIGN_LAYER: OCI_LAYER_NONDIST,
    DOCKER_FOREIGN_LAYER_GZIP: OCI_LAYER_NONDIST_GZIP,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD,
}

# manifest.SupportedSchema2MediaType
_SCHEMA2_MEDIA_TYPES = frozenset(
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


def _too_deep(raw: bytes, what: str, e: GoJSONNestingError) -> ManifestError:
    return ManifestError(f"{what} {digest_of(raw)}: {e}")


def guess_mime_type(raw: bytes) -> str:
    """``manifest.GuessMIMEType``: the recognized MIME type of a manifest blob, or "".

    Unlike Go's, raises ManifestError for a blob nested too deeply to be parsed (Go's "" would make it
    an unknown type and hide why).
    """
    try:
        meta = gojson.unmarshal(raw, _GUESS_META)
    except GoJSONNestingError as e:
        raise _too_deep(raw, "manifest", e) from None
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


def _decode(raw: bytes, schema: Struct, what: str) -> dict[str, Any]:
    try:
        return gojson.unmarshal(raw, schema)
    except GoJSONNestingError as e:
        raise _too_deep(raw, what, e) from None
    except GoJSONError as e:
        raise ManifestError(f"parsing {what}: {e}") from None


def _reject_ambiguous(raw: bytes, mime: str, allowed: tuple[str, ...]) -> None:
    """``ValidateUnambiguousManifestFormat``."""
    fields = _decode(raw, _DETECTED_FIELDS, mime)
    unexpected = [n for n, v in fields.items() if v is not None and n not in allowed]
    if unexpected:
        listed = ", ".join(go_quote(n) for n in unexpected)
        raise ManifestError(
            f"rejecting ambiguous manifest, unexpected fields []string{{{listed}}} in supposedly {mime}"
        )


# ---- platforms and instance selection --------------------------------------------------------


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str = ""


_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64",
    "loongarch64": "loong64",
}

# From most capable to most compatible; architectures without variants have no entry.
_VARIANT_COMPATIBILITY = {"amd64": ("v4", "v3", "v2"), "arm": ("v8", "v7", "v6", "v5"), "arm64": ("v8",)}

_ARM_CPU_ARCH_VARIANTS = {
    "8": "v8",
    "aarch64": "v8",
    "7m": "v7",
    "?(12)": "v7",
    "?(13)": "v7",
    "?(14)": "v7",
    "?(15)": "v7",
    "?(16)": "v7",
    "?(17)": "v7",
    "6": "v6",
    "6tej": "v6",
    "5": "v5",
    "5t": "v5",
    "5te": "v5",
    "5tej": "v5",
    "4": "v4",
    "4t": "v4",
    "3": "v3",
}


def host_os() -> str:
    """``runtime.GOOS`` of this host."""
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "win32":
        return "windows"
    if sys.platform.startswith("freebsd"):
        return "freebsd"
    return sys.platform


def host_arch() -> str:
    """``runtime.GOARCH`` of this host."""
    machine = _host.machine().lower()
    if machine in _GOARCH:
        return _GOARCH[machine]
    if machine.startswith("arm"):
        return "arm"
    return machine


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() == key.lower():
                    return value.strip()
    except OSError:
        return None
    return None


def _amd64_level(flags: set[str]) -> str:
    v2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"} <= flags
    v3 = v2 and {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    return "v4" if v4 else "v3" if v3 else "v2" if v2 else "v1"


def host_variant(os_name: str, arch: str) -> str:
    """The detected CPU variant (c/image ``getCPUVariant``)."""
    if os_name in ("darwin", "windows"):
        return {"arm64": "v8", "arm": "v7", "amd64": "v1"}.get(arch, "")
    if arch in ("arm", "arm64"):
        value = _cpuinfo("Cpu architecture")
        if value is None:
            return ""
        value = value.lower()
        if value == "7":
            model = (_cpuinfo("model name") or "").lower()
            return "v6" if model.startswith("armv6-compatible") else "v7"
        return _ARM_CPU_ARCH_VARIANTS.get(value, "")
    if arch == "amd64":
        flags = _cpuinfo("flags")
        return _amd64_level(set(flags.split())) if flags else "v1"
    return ""


def _normalize_variant(arch: str, variant: str) -> str:
    return "" if arch == "amd64" and variant == "v1" else variant


def wanted_platforms(
    override_os: str | None = None,
    override_arch: str | None = None,
    override_variant: str | None = None,
    *,
    detect_amd64_variant: bool = False,
) -> list[Platform]:
    """Candidate platforms in preference order, like c/image ``WantedPlatforms``."""
    arch = override_arch or host_arch()
    os_name = override_os or host_os()
    variant = ""
    if not override_arch and (arch != "amd64" or detect_amd64_variant):
        variant = host_variant(host_os(), arch)
    if override_variant:
        variant = override_variant
    variant = _normalize_variant(arch, variant)
    if variant:
        order = _VARIANT_COMPATIBILITY.get(arch, ())
        variants = list(order[order.index(variant) :]) if variant in order else [variant]
        variants.append("")
    else:
        variants = [""]
        if arch != "amd64":
            variants.extend(_VARIANT_COMPATIBILITY.get(arch, ()))
    return [Platform(os=os_name, architecture=arch, variant=v) for v in variants]


def _matches(os_name: str, arch: str, variant: str, wanted: Platform) -> bool:
    return (
        arch == wanted.architecture
        and os_name == wanted.os
        and _normalize_variant(arch, variant) == _normalize_variant(wanted.architecture, wanted.variant)
    )


def _platform_index(os_name: str, arch: str, variant: str, platforms: list[Platform]) -> int | None:
    for i, w in enumerate(platforms):
        if _matches(os_name, arch, variant, w):
            return i
    return None


def choose_instance(raw_list: bytes, mime: str, platforms: list[Platform]) -> str:
    """The digest of the list instance for ``platforms`` (c/image ``ChooseInstance``)."""
    if not platforms:
        raise ManifestError("no wanted platforms")
    w0 = platforms[0]
    wanted_text = f"architecture {go_quote(w0.architecture)}, variant {go_quote(w0.variant)}, OS {go_quote(w0.os)}"
    normalized = normalized_mime_type(mime)
    if normalized == DOCKER_V2_LIST:
        lst = _decode(raw_list, SCHEMA2_LIST, "docker manifest list")
        _reject_ambiguous(raw_list, DOCKER_V2_LIST, ("manifests",))
        entries = lst["manifests"] or []
        for wanted in platforms:
            for d in entries:
                p = d["platform"]
                if _matches(p["os"], p["architecture"], p["variant"], wanted):
                    return _checked_instance_digest(d["digest"])
        raise ManifestError(f"no image found in manifest list for {wanted_text}")
    if normalized == OCI_INDEX:
        index = _decode(raw_list, OCI_INDEX_STRUCT, "OCI image index")
        _reject_ambiguous(raw_list, OCI_INDEX, ("manifests",))
        best: tuple[int, int, int, int] | None = None
        best_digest = ""
        for position, d in enumerate(index["manifests"] or []):
            rank = sys.maxsize
            if d["platform"] is not None:
                p = d["platform"]
                found = _platform_index(p["os"], p["architecture"], p["variant"], platforms)
                if found is None:
                    continue
                rank = found
            annotations = d["annotations"] or {}
            is_zstd = annotations.get(ANNOTATION_ZSTD) == "true"
            sentinel = annotations.get(ANNOTATION_ZSTD_CHUNKED_SENTINEL) == "true"
            key = (rank, 0 if is_zstd else 1, 0 if sentinel else 1, position)
            if best is None or key < best:
                best, best_digest = key, d["digest"]
        if best is None:
            raise ManifestError(f"no image found in image index for {wanted_text}")
        return _checked_instance_digest(best_digest)
    if normalized in (DOCKER_V2S1, DOCKER_V2S1_SIGNED, OCI_MANIFEST, DOCKER_V2S2):
        raise ManifestError("Treating single images as manifest lists is not implemented")
    raise ManifestError(f"Unimplemented manifest list MIME type {mime} (normalized as {normalized})")


def _checked_instance_digest(d: str) -> str:
    if not is_valid_digest(d):
        raise ManifestError(f"invalid instance digest {go_quote(d)} in manifest list")
    return d


# ---- image manifests -------------------------------------------------------------------------


@attrs.frozen
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: dict[str, str] | None = None


@attrs.frozen
class ImageManifest:
    mime: str  # OCI_MANIFEST or DOCKER_V2S2
    config: Descriptor
    layers: list[Descriptor]


def _descriptor(d: dict[str, Any], what: str) -> Descriptor:
    if not is_valid_digest(d["digest"]):
        raise ManifestError(f"invalid digest {go_quote(d['digest'])} for {what}")
    if d["size"] < 0:
        raise ManifestError(f"invalid size {d['size']} for {what}")
    return Descriptor(
        media_type=d["mediaType"],
        digest=d["digest"],
        size=d["size"],
        urls=tuple(d["urls"] or ()),
        annotations=d.get("annotations"),
    )


def parse_image_manifest(raw: bytes, mime: str) -> ImageManifest:
    """Parse and validate a single-image manifest of type ``mime`` (as GetManifest accepts)."""
    if mime in (DOCKER_V2S1, DOCKER_V2S1_SIGNED):
        raise ManifestError(f"unsupported legacy manifest MIME type: {mime}")
    if mime == OCI_MANIFEST:
        m = _decode(raw, OCI_MANIFEST_STRUCT, "OCI image manifest")
        _reject_ambiguous(raw, mime, ("config", "layers"))
    elif mime == DOCKER_V2S2:
        m = _decode(raw, SCHEMA2_MANIFEST, "docker schema2 manifest")
        _reject_ambiguous(raw, mime, ("config", "layers"))
        for mt in [m["mediaType"]] + [layer["mediaType"] for layer in m["layers"] or []]:
            if mt not in _SCHEMA2_MEDIA_TYPES:
                raise ManifestError(f"unsupported docker v2s2 media type: {go_quote(mt)}")
    else:
        raise ManifestError(f"unsupported manifest MIME type: {mime}")
    config = _descriptor(m["config"], "config")
    layers = [_descriptor(d, f"layer {i}") for i, d in enumerate(m["layers"] or [])]
    return ImageManifest(mime=mime, config=config, layers=layers)


def require_image_config(manifest: ImageManifest) -> None:
    """OCI manifests of artifacts have no image config (c/image ``NonImageArtifactError``)."""
    if manifest.mime != OCI_MANIFEST or manifest.config.media_type == OCI_CONFIG:
        return
    mt = manifest.config.media_type
    if mt == DOCKER_CONFIG:
        raise ManifestError(f"invalid mixed OCI image with Docker v2s2 config ({go_quote(mt)})")
    raise ManifestError(f"unsupported image-specific operation on artifact with type {go_quote(mt)}")


def to_oci_manifest(raw: bytes, mime: str, config_blob: bytes | None = None) -> bytes:
    """The manifest GetManifest sends: ``raw`` if already OCI, else c/image's conversion.

    Converting docker schema2 needs the (verified) config blob: the OCI manifest references
    the re-serialized OCI config, whose digest and size differ from the original's.
    """
    if mime == OCI_MANIFEST:
        return raw
    manifest = parse_image_manifest(raw, mime)
    if config_blob is None:
        raise ManifestError("internal error: converting a docker schema2 manifest needs its config blob")
    config_bytes = oci_full_config(config_blob)
    layers = []
    for layer in manifest.layers:
        oci_type = _DOCKER_TO_OCI_LAYER.get(layer.media_type)
        if oci_type is None:
            raise ManifestError(f"Unknown media type during manifest conversion: {go_quote(layer.media_type)}")
        d: dict[str, Any] = {"mediaType": oci_type, "digest": layer.digest, "size": layer.size}
        if layer.urls:
            d["urls"] = list(layer.urls)
        layers.append(d)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config_bytes), "size": len(config_bytes)},
        "layers": layers,
    }
    return gojson.marshal(doc)


# ---- configs ---------------------------------------------------------------------------------


def _oci_image(config_blob: bytes) -> dict[str, Any]:
    try:
        return gojson.unmarshal(config_blob, OCI_IMAGE)
    except GoJSONNestingError as e:
        raise _too_deep(config_blob, "image config", e) from None
    except GoJSONError as e:
        raise ManifestError(f"parsing image config: {e}") from None


def oci_full_config(config_blob: bytes) -> bytes:
    """GetFullConfig's bytes: ``json.Marshal`` of ``imgspecv1.Image`` decoded from the blob."""
    return gojson.marshal(gojson.encode_value(_oci_image(config_blob), OCI_IMAGE))


def oci_runtime_config(config_blob: bytes) -> bytes:
    """GetConfig's bytes: ``json.Marshal`` of the ``config`` (ImageConfig) part only."""
    image = _oci_image(config_blob)
    return gojson.marshal(gojson.encode_value(image["config"], OCI_IMAGE_CONFIG))


def layer_infos(manifest: ImageManifest) -> list[dict[str, Any]]:
    """GetLayerInfo entries: digest, size and media type of the original manifest's layers."""
    return [{"digest": d.digest, "size": d.size, "media_type": d.media_type} for d in manifest.layers]


__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_FOREIGN_LAYER",
    "DOCKER_FOREIGN_LAYER_GZIP",
    "DOCKER_LAYER",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_ZSTD",
    "DOCKER_V2S1",
    "DOCKER_V2S1_SIGNED",
    "DOCKER_V2S2",
    "DOCKER_V2_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_NONDIST",
    "OCI_LAYER_NONDIST_GZIP",
    "OCI_LAYER_NONDIST_ZSTD",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "Descriptor",
    "ImageManifest",
    "ManifestError",
    "Platform",
    "choose_instance",
    "digest_of",
    "guess_mime_type",
    "is_list",
    "is_valid_digest",
    "layer_infos",
    "manifest_digest",
    "normalized_mime_type",
    "oci_full_config",
    "oci_runtime_config",
    "parse_image_manifest",
    "require_image_config",
    "to_oci_manifest",
    "wanted_platforms",
]
