"""Fuzz target: manifests, indexes and configs (proxy.image.manifest, proxy.image.gojson), and the TOC hints a layer's
annotations and last bytes give (proxy.partial.toc).

Input: one document, any bytes, handed to every entry point that takes a manifest, a list or a config from
outside: ``guess_mime_type``, ``manifest_digest``, ``parse_image_manifest`` (each MIME type), then
``require_image_config``, ``layer_infos``, ``to_oci_manifest`` and the TOC location of each layer;
``choose_instance`` (both list types), ``oci_full_config``, ``oci_runtime_config``; ``gojson.unmarshal`` into
the index, manifest, list and image structs (as for index.json and configs) and ``interface{}``, and
``marshal`` of what it decoded; ``toc.from_footer`` and ``toc.tar_split_digest``.

Invariants: only the documented errors escape (``ManifestError``, ``GoJSONError``, ``TocError``); what
``unmarshal`` decoded always marshals again, to UTF-8 JSON that parses; a converted manifest parses as OCI.

Run: ``python -m tests.fuzz.fuzz_manifest [libFuzzer flags] tests/fuzz/corpus/fuzz_manifest``.
"""

from __future__ import annotations

import contextlib
import json

import atheris

from tests.fuzz import _common

with atheris.instrument_imports(
    include=["proxy.image.manifest", "proxy.image.gojson", "proxy.common.jsonlimits", "proxy.partial.toc"]
):
    from proxy.image import gojson
    from proxy.image import manifest as mf
    from proxy.partial import toc

MIME_TYPES = (mf.OCI_MANIFEST, mf.DOCKER_V2S2, mf.DOCKER_V2S1, mf.DOCKER_V2S1_SIGNED, mf.OCI_INDEX, "", "text/x")
LIST_TYPES = (mf.OCI_INDEX, mf.DOCKER_V2_LIST, mf.OCI_MANIFEST, "")
PLATFORMS = (
    mf.wanted_platforms("linux", "amd64"),
    mf.wanted_platforms("linux", "arm", "v7"),
    mf.wanted_platforms("windows", "arm64"),
)
SCHEMAS = (
    mf.OCI_INDEX_STRUCT,
    mf.OCI_MANIFEST_STRUCT,
    mf.SCHEMA2_MANIFEST,
    mf.SCHEMA2_LIST,
    mf.OCI_IMAGE,
    gojson.ANY,
    gojson.MapOf(gojson.STRING),
    gojson.ListOf(gojson.INT),
)
#: a config blob for converting schema2 manifests
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"Env":["A=b"]}}'


def check_marshal(value: object, schema: object) -> None:
    out = gojson.marshal(gojson.encode_value(value, schema))
    json.loads(out.decode("utf-8"))


def with_manifest(raw: bytes, mime: str) -> None:
    try:
        parsed = mf.parse_image_manifest(raw, mime)
    except mf.ManifestError:
        return
    assert parsed.mime in (mf.OCI_MANIFEST, mf.DOCKER_V2S2), parsed.mime
    for layer in parsed.layers:
        assert mf.is_valid_digest(layer.digest) and layer.size >= 0, layer
        try:
            location = toc.from_annotations(layer.annotations)
            if location is not None:
                toc.check_caps(location, layer.size)
        except toc.TocError:
            pass
    infos = mf.layer_infos(parsed)
    json.loads(gojson.marshal(infos))
    with contextlib.suppress(mf.ManifestError):
        mf.require_image_config(parsed)
    for config in (CONFIG, raw):
        try:
            converted = mf.to_oci_manifest(raw, mime, config)
        except mf.ManifestError:
            continue
        mf.parse_image_manifest(converted, mf.OCI_MANIFEST)  # what we convert, we can read


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(mf.ManifestError):
        mf.guess_mime_type(data)
    with contextlib.suppress(mf.ManifestError):
        mf.manifest_digest(data)
    for mime in MIME_TYPES:
        with_manifest(data, mime)
    for mime in LIST_TYPES:
        for platforms in PLATFORMS:
            try:
                chosen = mf.choose_instance(data, mime, platforms)
            except mf.ManifestError:
                continue
            assert mf.is_valid_digest(chosen), chosen
    for convert in (mf.oci_full_config, mf.oci_runtime_config):
        try:
            out = convert(data)
        except mf.ManifestError:
            continue
        json.loads(out.decode("utf-8"))
    for schema in SCHEMAS:
        try:
            value = gojson.unmarshal(data, schema)
        except gojson.GoJSONError:
            continue
        check_marshal(value, schema)
    with contextlib.suppress(toc.TocError):
        toc.tar_split_digest(data)
    tail = data[-toc.TAIL_SIZE :]
    for size in (len(data), len(data) + 1000, toc.TAIL_SIZE):
        location = toc.from_footer(tail, size)
        if location is not None and location.toc is not None:
            assert location.toc.offset >= 0 and location.toc.length >= 0, location


def main() -> None:
    _common.run("fuzz_manifest", test_one_input)


if __name__ == "__main__":
    main()
