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

from typing import Any

import attrs

from protocol.digests import digest_of, is_valid_digest
from proxy.image import gojson
from proxy.image.formats import (
    ANNOTATION_REF_NAME,
    ANNOTATION_ZSTD,
    ANNOTATION_ZSTD_CHUNKED_SENTINEL,
    DOCKER_CONFIG,
    DOCKER_FOREIGN_LAYER,
    DOCKER_FOREIGN_LAYER_GZIP,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD,
    DOCKER_TO_OCI_LAYER,
    DOCKER_V2_LIST,
    DOCKER_V2S1,
    DOCKER_V2S1_SIGNED,
    DOCKER_V2S2,
    OCI_CONFIG,
    OCI_DESCRIPTOR,
    OCI_HISTORY,
    OCI_IMAGE,
    OCI_IMAGE_CONFIG,
    OCI_INDEX,
    OCI_INDEX_STRUCT,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_NONDIST,
    OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_NONDIST_ZSTD,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    OCI_MANIFEST_STRUCT,
    OCI_PLATFORM,
    OCI_ROOTFS,
    SCHEMA2_DESCRIPTOR,
    SCHEMA2_LIST,
    SCHEMA2_MANIFEST,
    SCHEMA2_MEDIA_TYPES,
    SCHEMA2_PLATFORM,
    ManifestError,
    decode,
    guess_mime_type,
    is_list,
    manifest_digest,
    normalized_mime_type,
    reject_ambiguous,
    too_deep,
)
from proxy.image.gojson import (
    GoJSONError,
    GoJSONNestingError,
    go_quote,
)
from proxy.image.platforms import (
    Platform,
    choose_instance,
    host_arch,
    host_os,
    host_variant,
    wanted_platforms,
)

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
        m = decode(raw, OCI_MANIFEST_STRUCT, "OCI image manifest")
        reject_ambiguous(raw, mime, ("config", "layers"))
    elif mime == DOCKER_V2S2:
        m = decode(raw, SCHEMA2_MANIFEST, "docker schema2 manifest")
        reject_ambiguous(raw, mime, ("config", "layers"))
        for mt in [m["mediaType"]] + [layer["mediaType"] for layer in m["layers"] or []]:
            if mt not in SCHEMA2_MEDIA_TYPES:
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
        oci_type = DOCKER_TO_OCI_LAYER.get(layer.media_type)
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
        raise too_deep(config_blob, "image config", e) from None
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
    "ANNOTATION_REF_NAME",
    "ANNOTATION_ZSTD",
    "ANNOTATION_ZSTD_CHUNKED_SENTINEL",
    "DOCKER_CONFIG",
    "DOCKER_FOREIGN_LAYER",
    "DOCKER_FOREIGN_LAYER_GZIP",
    "DOCKER_LAYER",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_ZSTD",
    "DOCKER_TO_OCI_LAYER",
    "DOCKER_V2S1",
    "DOCKER_V2S1_SIGNED",
    "DOCKER_V2S2",
    "DOCKER_V2_LIST",
    "OCI_CONFIG",
    "OCI_DESCRIPTOR",
    "OCI_HISTORY",
    "OCI_IMAGE",
    "OCI_IMAGE_CONFIG",
    "OCI_INDEX",
    "OCI_INDEX_STRUCT",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_NONDIST",
    "OCI_LAYER_NONDIST_GZIP",
    "OCI_LAYER_NONDIST_ZSTD",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "OCI_MANIFEST_STRUCT",
    "OCI_PLATFORM",
    "OCI_ROOTFS",
    "SCHEMA2_DESCRIPTOR",
    "SCHEMA2_LIST",
    "SCHEMA2_MANIFEST",
    "SCHEMA2_MEDIA_TYPES",
    "SCHEMA2_PLATFORM",
    "Descriptor",
    "ImageManifest",
    "ManifestError",
    "Platform",
    "choose_instance",
    "decode",
    "digest_of",
    "guess_mime_type",
    "host_arch",
    "host_os",
    "host_variant",
    "is_list",
    "is_valid_digest",
    "layer_infos",
    "manifest_digest",
    "normalized_mime_type",
    "oci_full_config",
    "oci_runtime_config",
    "parse_image_manifest",
    "reject_ambiguous",
    "require_image_config",
    "to_oci_manifest",
    "too_deep",
    "wanted_platforms",
]
