"""proxy.image.manifest: MIME guessing, instance choice, parsing, and the bytes GetManifest/GetConfig/
GetFullConfig/GetLayerInfo produce, compared with the real skopeo where it can show them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.image import manifest as mf
from proxy.image.manifest import ManifestError, Platform
from tests.unit.layouts import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_V2S2,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    digest,
    dir_image,
    dumps,
    gz,
    image_config,
    skopeo,
    tar_bytes,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
D4 = "sha256:" + "4" * 64


# ---- guess_mime_type / digests ------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"schemaVersion": 2, "mediaType": OCI_MANIFEST}, OCI_MANIFEST),
        ({"mediaType": mf.DOCKER_V2_LIST}, mf.DOCKER_V2_LIST),
        ({"schemaVersion": 1}, mf.DOCKER_V2S1),
        ({"schemaVersion": 1, "signatures": []}, mf.DOCKER_V2S1_SIGNED),
        ({"schemaVersion": 1, "signatures": None}, mf.DOCKER_V2S1),
        ({"schemaVersion": 2, "config": {"mediaType": OCI_CONFIG}}, OCI_MANIFEST),
        ({"schemaVersion": 2, "config": {"mediaType": DOCKER_CONFIG}}, DOCKER_V2S2),
        ({"schemaVersion": 2, "manifests": [{"digest": D1}]}, mf.OCI_INDEX),
        ({"schemaVersion": 2, "config": {"mediaType": "x/y"}, "layers": []}, OCI_MANIFEST),
        ({"SchemaVersion": 2, "CONFIG": {"MediaType": OCI_CONFIG}}, OCI_MANIFEST),  # Go folds keys
        ({"schemaVersion": 2.0}, ""),  # not an int for Go
        ({"schemaVersion": 3}, ""),
        ({"mediaType": 5}, ""),
        ([], ""),
    ],
)
def test_guess_mime_type_like_c_image(doc, expected):
    assert mf.guess_mime_type(dumps(doc)) == expected


def test_guess_mime_type_of_garbage_is_empty():
    assert mf.guess_mime_type(b"\x00not json") == ""


def test_manifest_digest_is_sha256_of_the_bytes():
    raw = b'{"schemaVersion":2}'
    assert mf.manifest_digest(raw) == digest(raw)


def test_is_list():
    assert mf.is_list(mf.OCI_INDEX) and mf.is_list(mf.DOCKER_V2_LIST)
    assert not mf.is_list(OCI_MANIFEST) and not mf.is_list(DOCKER_V2S2)


# ---- platforms -------------------------------------------------------------------------------


def test_wanted_platforms_with_overrides():
    assert mf.wanted_platforms("linux", "amd64") == [Platform("linux", "amd64", "")]
    assert mf.wanted_platforms("linux", "arm64") == [Platform("linux", "arm64", ""), Platform("linux", "arm64", "v8")]
    assert mf.wanted_platforms("linux", "arm", "v7") == [Platform("linux", "arm", v) for v in ("v7", "v6", "v5", "")]
    assert mf.wanted_platforms("linux", "amd64", "v3") == [Platform("linux", "amd64", v) for v in ("v3", "v2", "")]
    assert mf.wanted_platforms("linux", "amd64", "v1") == [Platform("linux", "amd64", "")]
    assert mf.wanted_platforms("linux", "riscv64", "rva23") == [
        Platform("linux", "riscv64", "rva23"),
        Platform("linux", "riscv64", ""),
    ]


def test_wanted_platforms_of_the_host_end_with_an_empty_variant_or_compatible_ones():
    platforms = mf.wanted_platforms()
    assert platforms[0].os == mf.host_os() and platforms[0].architecture == mf.host_arch()
    assert "" in [p.variant for p in platforms]


def _oci_index(entries):
    return dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": entries})


def _entry(d, arch=None, variant=None, zstd=False, os_name="linux"):
    e = {"mediaType": OCI_MANIFEST, "digest": d, "size": 1}
    if arch is not None:
        e["platform"] = {"architecture": arch, "os": os_name}
        if variant:
            e["platform"]["variant"] = variant
    if zstd:
        e["annotations"] = {mf.ANNOTATION_ZSTD: "true"}
    return e


AMD64 = mf.wanted_platforms("linux", "amd64")
ARM64 = mf.wanted_platforms("linux", "arm64", "v8")


def test_oci_index_ranks_platform_then_zstd_then_position():
    raw = _oci_index(
        [_entry(D1, "arm64"), _entry(D2, "amd64"), _entry(D3, "arm64", "v8"), _entry(D4, "amd64", zstd=True)]
    )
    assert mf.choose_instance(raw, mf.OCI_INDEX, AMD64) == D4
    assert mf.choose_instance(raw, mf.OCI_INDEX, ARM64) == D3  # v8 is preferred over ""


def test_oci_index_entries_without_platform_come_last():
    raw = _oci_index([_entry(D1), _entry(D2, "amd64")])
    assert mf.choose_instance(raw, mf.OCI_INDEX, AMD64) == D2
    assert mf.choose_instance(raw, mf.OCI_INDEX, ARM64) == D1


def test_no_match_names_the_wanted_platform_like_c_image():
    raw = _oci_index([_entry(D1, "s390x")])
    with pytest.raises(
        ManifestError, match=r'^no image found in image index for architecture "arm64", variant "v8", OS "linux"$'
    ):
        mf.choose_instance(raw, mf.OCI_INDEX, ARM64)


def _docker_list(entries):
    manifests = [
        {"mediaType": DOCKER_V2S2, "size": 1, "digest": d, "platform": {"architecture": a, "os": "linux", "variant": v}}
        for d, a, v in entries
    ]
    return dumps({"schemaVersion": 2, "mediaType": mf.DOCKER_V2_LIST, "manifests": manifests})


def test_docker_list_takes_the_first_match_of_the_most_preferred_platform():
    raw = _docker_list([(D1, "arm64", ""), (D2, "arm64", "v8"), (D3, "amd64", "v1"), (D4, "amd64", "")])
    assert mf.choose_instance(raw, mf.DOCKER_V2_LIST, ARM64) == D2
    assert mf.choose_instance(raw, mf.DOCKER_V2_LIST, AMD64) == D3  # amd64 v1 == ""
    with pytest.raises(ManifestError, match=r'^no image found in manifest list for architecture "ppc64le"'):
        mf.choose_instance(raw, mf.DOCKER_V2_LIST, mf.wanted_platforms("linux", "ppc64le"))


def test_instance_digests_from_lists_are_validated():
    raw = _oci_index([_entry("sha256:../../etc/passwd", "amd64")])
    with pytest.raises(ManifestError, match="invalid instance digest"):
        mf.choose_instance(raw, mf.OCI_INDEX, AMD64)


def test_choose_instance_rejects_single_images_and_ambiguous_lists():
    with pytest.raises(ManifestError, match="not implemented"):
        mf.choose_instance(b"{}", OCI_MANIFEST, AMD64)
    raw = dumps({"schemaVersion": 2, "manifests": [_entry(D1, "amd64")], "layers": []})
    with pytest.raises(ManifestError, match=r'unexpected fields \[\]string\{"layers"\}'):
        mf.choose_instance(raw, mf.OCI_INDEX, AMD64)


# ---- image manifests -------------------------------------------------------------------------


def _oci_manifest(**changes):
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": D2, "size": 20, "annotations": {"a": "b"}}],
    }
    doc.update(changes)
    return dumps(doc)


def test_parse_oci_manifest_and_layer_infos():
    m = mf.parse_image_manifest(_oci_manifest(), OCI_MANIFEST)
    assert m.config == mf.Descriptor(OCI_CONFIG, D1, 10)
    assert m.layers[0].annotations == {"a": "b"}
    assert mf.layer_infos(m) == [{"digest": D2, "size": 20, "media_type": OCI_LAYER_GZIP}]


@pytest.mark.parametrize(
    ("raw", "mime", "message"),
    [
        (b"{}", mf.DOCKER_V2S1_SIGNED, "^unsupported legacy manifest MIME type: application/vnd.docker"),
        (b"{}", mf.DOCKER_V2S1, "^unsupported legacy manifest MIME type"),
        (b"{}", mf.OCI_INDEX, "^unsupported manifest MIME type: application/vnd.oci.image.index.v1"),
        (b"{}", "text/plain", "^unsupported manifest MIME type: text/plain"),
        (b"{nope", OCI_MANIFEST, "^parsing OCI image manifest"),
        (b"[]", OCI_MANIFEST, "^parsing OCI image manifest"),
        (_oci_manifest(layers={}), OCI_MANIFEST, "cannot unmarshal object"),
        (
            _oci_manifest(config={"mediaType": OCI_CONFIG, "digest": "sha256:abc", "size": 1}),
            OCI_MANIFEST,
            "invalid digest",
        ),
        (
            _oci_manifest(config={"mediaType": OCI_CONFIG, "digest": "sha256:" + "A" * 64, "size": 1}),
            OCI_MANIFEST,
            "invalid digest",
        ),
        (
            _oci_manifest(config={"mediaType": OCI_CONFIG, "digest": "md5:" + "a" * 32, "size": 1}),
            OCI_MANIFEST,
            "invalid digest",
        ),
        (_oci_manifest(config={"mediaType": OCI_CONFIG, "digest": D1, "size": -1}), OCI_MANIFEST, "invalid size -1"),
        (_oci_manifest(config={"mediaType": OCI_CONFIG, "digest": D1, "size": 1.5}), OCI_MANIFEST, "cannot unmarshal"),
        (_oci_manifest(manifests=[]), OCI_MANIFEST, "rejecting ambiguous manifest"),
    ],
)
def test_parse_image_manifest_errors(raw, mime, message):
    with pytest.raises(ManifestError, match=message):
        mf.parse_image_manifest(raw, mime)


def test_schema2_layer_media_types_are_checked():
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_V2S2,
        "config": {"mediaType": DOCKER_CONFIG, "size": 1, "digest": D1},
        "layers": [{"mediaType": "x/y", "size": 1, "digest": D2}],
    }
    with pytest.raises(ManifestError, match='unsupported docker v2s2 media type: "x/y"'):
        mf.parse_image_manifest(dumps(doc), DOCKER_V2S2)


def test_oci_manifest_is_passed_through_unchanged():
    raw = _oci_manifest() + b"\n"
    assert mf.to_oci_manifest(raw, OCI_MANIFEST) is raw


def test_artifacts_have_no_image_config():
    m = mf.parse_image_manifest(
        _oci_manifest(config={"mediaType": "application/x-artifact", "digest": D1, "size": 1}), OCI_MANIFEST
    )
    with pytest.raises(ManifestError, match='artifact with type "application/x-artifact"'):
        mf.require_image_config(m)


def test_garbage_config_is_a_manifest_error():
    for bad in (b"", b"{", b"[]", b'{"config":{"Env":"x"}}', b'{"created":"not a time"}'):
        with pytest.raises(ManifestError):
            mf.oci_full_config(bad)
        with pytest.raises(ManifestError):
            mf.oci_runtime_config(bad)


def test_full_and_runtime_config_of_an_empty_config():
    assert mf.oci_full_config(b"{}") == b'{"architecture":"","os":"","config":{},"rootfs":{"type":"","diff_ids":null}}'
    assert mf.oci_runtime_config(b"null") == b"{}"


def test_variant_follows_os_features_as_in_image_spec_1_1():
    cfg = dumps({"variant": "v8", "os": "linux", "architecture": "arm64", "os.features": ["a"]})
    assert mf.oci_full_config(cfg).startswith(
        b'{"architecture":"arm64","os":"linux","os.features":["a"],"variant":"v8"'
    )


# ---- against skopeo: docker schema2 -> OCI conversion -----------------------------------------

CONFIGS = {
    "plain": image_config([]),
    "rich": image_config(
        [],
        config={
            "User": "u",
            "ExposedPorts": {"80/tcp": {}, "443/tcp": None},
            "Env": ["A=<b>&c"],
            "Labels": {"z": "1", "a": "é\u2028", "Z": "x"},
            "ArgsEscaped": True,
            "Healthcheck": {"Test": ["x"]},
            "Volumes": {"/v": {}},
            "WorkingDir": "/w",
            "StopSignal": "TERM",
            "Entrypoint": ["e"],
            "cmd": ["lower-case key"],
        },
        container_config={"Hostname": "h"},
        docker_version="20.10",
        author="me",
        created="2024-01-02T03:04:05.123400000+01:00",
        ARCHITECTURE="arm64",
        **{"os.version": "1", "os.features": ["f"]},
    ),
    "empty": {},
    "nulls": {"config": None, "rootfs": None, "history": None, "created": None},
    "duplicates": {
        "config": {"User": "a", "Env": ["x"], "Labels": {"k": "1"}},
        "Config": {"Env": ["y"], "Labels": {"j": "2"}},
        "rootfs": {"diff_ids": []},
        "history": [{}, {"empty_layer": False, "created": "2020-01-01T01:02:03,5Z", "comment": "<>"}],
    },
    "unicode": {
        "author": "\u00e9\U0001f600\x7f\x01",
        "config": {"Labels": {"\u00e9": "1", "e": "2", "\U0001f600": "3"}},
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_schema2_conversion_and_config_match_skopeo(name, tmp_path: Path):
    cfg = dumps(CONFIGS[name])
    layer = gz(tar_bytes({"a": b"1"}))
    foreign = gz(tar_bytes({"b": b"2"}))
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_V2S2,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(cfg), "digest": digest(cfg)},
        "layers": [
            {"mediaType": DOCKER_LAYER_GZIP, "size": len(layer), "digest": digest(layer)},
            {
                "mediaType": mf.DOCKER_FOREIGN_LAYER_GZIP,
                "size": len(foreign),
                "digest": digest(foreign),
                "urls": ["http://example.com/<x>"],
            },
        ],
    }
    raw = dumps(doc)
    dir_image(tmp_path / "src", raw, [cfg, layer, foreign])
    skopeo("copy", "-q", f"dir:{tmp_path / 'src'}", f"oci:{tmp_path / 'out'}")
    index = json.loads((tmp_path / "out" / "index.json").read_bytes())
    blobs = tmp_path / "out" / "blobs" / "sha256"
    theirs = (blobs / index["manifests"][0]["digest"][7:]).read_bytes()
    theirs_config = (blobs / json.loads(theirs)["config"]["digest"][7:]).read_bytes()

    assert mf.oci_full_config(cfg) == theirs_config
    assert mf.to_oci_manifest(raw, DOCKER_V2S2, cfg) == theirs
    runtime = json.loads(theirs_config)["config"]
    assert json.loads(mf.oci_runtime_config(cfg)) == runtime


def test_docker_layer_types_map_to_oci_ones():
    cfg = b"{}"
    layers = [
        {"mediaType": t, "size": 1, "digest": D2}
        for t in (
            DOCKER_LAYER_GZIP,
            mf.DOCKER_LAYER,
            mf.DOCKER_LAYER_ZSTD,
            mf.DOCKER_FOREIGN_LAYER,
            mf.DOCKER_FOREIGN_LAYER_GZIP,
        )
    ]
    raw = dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_V2S2,
            "config": {"mediaType": DOCKER_CONFIG, "size": 2, "digest": digest(cfg)},
            "layers": layers,
        }
    )
    out = json.loads(mf.to_oci_manifest(raw, DOCKER_V2S2, cfg))
    assert [layer["mediaType"] for layer in out["layers"]] == [
        mf.OCI_LAYER_GZIP,
        mf.OCI_LAYER,
        mf.OCI_LAYER_ZSTD,
        mf.OCI_LAYER_NONDIST,
        mf.OCI_LAYER_NONDIST_GZIP,
    ]
    assert out["config"] == {
        "mediaType": OCI_CONFIG,
        "digest": digest(mf.oci_full_config(cfg)),
        "size": len(mf.oci_full_config(cfg)),
    }
    # GetLayerInfo keeps the original (docker) media types
    assert mf.layer_infos(mf.parse_image_manifest(raw, DOCKER_V2S2))[0]["media_type"] == DOCKER_LAYER_GZIP


def test_conversion_needs_the_config_blob():
    raw = dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_V2S2,
            "config": {"mediaType": DOCKER_CONFIG, "size": 2, "digest": D1},
            "layers": [],
        }
    )
    with pytest.raises(ManifestError, match="config blob"):
        mf.to_oci_manifest(raw, DOCKER_V2S2)
    assert mf.to_oci_manifest(raw, DOCKER_V2S2, b"{}").endswith(b',"layers":[]}')
