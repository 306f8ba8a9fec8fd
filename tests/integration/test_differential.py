"""Differential tests: the same request sequences sent to skopeo's proxy and to ours, over the same images.

Every scenario is a plain function driving a :class:`Session` (the independent wire driver of
tests/support/wire.py plus a transcript). It runs twice:

* ``test_skopeo_reference[...]`` runs it on skopeo alone and checks the transcript against what the
  image builder knows (digests, sizes, error texts), which validates the scenario, the harness and the
  images independently of our server;
* ``test_ours_matches_skopeo[...]`` runs it on both servers, checks our transcript against the builder
  too, then compares the two step by step: success flags, values, pipe ids (non-zero or not), pipe
  payloads (manifest, configs, every blob), FinishPipe outcomes and — where the text is the same in every
  protocol version — error texts. Keys are compared where both replies have them (skopeo < 1.19 speaks
  0.2.3 and has no ``error_code``); separately, every reply of ours must carry exactly the five 0.2.8 keys
  in order.

Methods newer than the installed skopeo (OpenImageOptional 0.2.4, GetLayerInfo 0.2.5, GetLayerInfoPiped
0.2.7, GetRawBlob 0.2.8) and texts that changed between versions are checked on ours against the
protocol notes and the builder's digests and sizes, and compared with skopeo too when it is new enough.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import AMD64, ARM64, S390X, SINGLE, BuiltImage, StandardImages, build_oci_layout
from tests.support.wire import REPLY_KEYS, ProxyProcess, SockfdMode, close_fds, reply_keys

Reply = dict[str, Any]
ERROR_CODES = {"EPIPE", "retryable", "other"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# ------------------------------------------------------------------------------------------ transcripts


@dataclass
class Step:
    """One request and everything it produced."""

    label: str
    reply: Reply
    data: bytes | None = None  # pipe payload
    finish: Reply | None = None  # FinishPipe reply
    error_fd: bytes | None = None  # GetRawBlob's error stream
    compare_value: bool = True
    compare_error: bool = True  # False where the text legitimately differs between protocol versions
    compare: bool = True  # False where we differ from skopeo by design (the expectation checks ours)


@dataclass
class Session:
    """Drives one server and records the steps a scenario takes."""

    proxy: ProxyProcess
    images: StandardImages
    extra: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    def record(self, step: Step) -> Step:
        if any(old.label == step.label for old in self.steps):
            raise AssertionError(f"duplicate step label {step.label!r}")
        self.steps.append(step)
        return step

    def call(self, label: str, method: str, args: Sequence[Any] = (), **flags: bool) -> Reply:
        _, reply, fds = self.proxy.call(method, args)
        close_fds(fds)
        assert not fds, f"{label}: {method} passed {len(fds)} fds with {reply}"
        return self.record(Step(label, reply, **flags)).reply

    def raw(self, label: str, packet: bytes, **flags: bool) -> Reply:
        _, reply, fds = self.proxy.call_raw(packet)
        close_fds(fds)
        assert not fds, f"{label}: passed {len(fds)} fds with {reply}"
        return self.record(Step(label, reply, **flags)).reply

    def piped(self, label: str, method: str, args: Sequence[Any] = (), **flags: bool) -> Step:
        reply, data, finish = self.proxy.call_piped(method, args)
        return self.record(Step(label, reply, data, finish, **flags))

    def shutdown(self) -> None:
        code = self.proxy.shutdown()
        self.record(Step("Shutdown", {"success": True, "value": code, "pipeid": 0, "error": ""}))

    def by_label(self) -> dict[str, Step]:
        return {step.label: step for step in self.steps}


Scenario = Callable[[Session], None]
Expectation = Callable[[dict[str, Step], StandardImages], None]


def run(
    scenario: Scenario,
    argv: Sequence[str],
    images: StandardImages,
    extra: dict[str, Any],
    sockfd_mode: SockfdMode = "stdin",
) -> tuple[list[Step], list[bytes]]:
    with ProxyProcess.spawn(argv, sockfd_mode) as proxy:
        session = Session(proxy, images, extra)
        scenario(session)
        return session.steps, list(proxy.received)


def assert_five_keys(received: Sequence[bytes]) -> None:
    """Every 0.2.8 reply: success, value, pipeid, error_code, error — in this order, consistent."""
    for raw in received:
        assert reply_keys(raw) == list(REPLY_KEYS), f"reply keys out of spec: {raw!r}"
        reply = json.loads(raw)
        if reply["success"]:
            assert reply["error_code"] == "" and reply["error"] == "", raw
        else:
            assert reply["error_code"] in ERROR_CODES and reply["error"], raw
        assert isinstance(reply["pipeid"], int) and reply["pipeid"] >= 0, raw


def assert_replies_agree(label: str, what: str, theirs: Reply, ours: Reply, step: Step) -> None:
    common = set(theirs) & set(ours)
    assert {"success", "value", "pipeid", "error"} <= common, f"{label} {what}: missing keys {theirs} / {ours}"
    assert ours["success"] == theirs["success"], f"{label} {what}: success differs: skopeo {theirs}, ours {ours}"
    if step.compare_value:
        assert ours["value"] == theirs["value"], f"{label} {what}: value differs: skopeo {theirs}, ours {ours}"
    assert bool(ours["pipeid"]) == bool(theirs["pipeid"]), f"{label} {what}: pipeid: skopeo {theirs}, ours {ours}"
    if step.compare_error:
        assert ours["error"] == theirs["error"], f"{label} {what}: error differs: skopeo {theirs}, ours {ours}"
    else:
        assert bool(ours["error"]) == bool(theirs["error"]), f"{label} {what}: skopeo {theirs}, ours {ours}"
    for key in common - {"success", "value", "pipeid", "error"}:
        assert ours[key] == theirs[key], f"{label} {what}: {key} differs: skopeo {theirs}, ours {ours}"


def assert_transcripts_agree(theirs: list[Step], ours: list[Step]) -> None:
    assert [s.label for s in ours] == [s.label for s in theirs], "the scenario took different paths"
    for a, b in zip(theirs, ours, strict=True):
        if not b.compare:
            continue
        assert_replies_agree(a.label, "reply", a.reply, b.reply, a)
        assert (a.data is None) == (b.data is None), f"{a.label}: pipe on one side only"
        if a.data is not None and b.data is not None:
            assert b.data == a.data, (
                f"{a.label}: pipe payload differs:\nskopeo {a.data[:300]!r}\nours   {b.data[:300]!r}"
            )
        assert (a.finish is None) == (b.finish is None), f"{a.label}: FinishPipe on one side only"
        if a.finish is not None and b.finish is not None:
            assert_replies_agree(a.label, "FinishPipe", a.finish, b.finish, a)
        assert b.error_fd == a.error_fd, f"{a.label}: error fd: skopeo {a.error_fd!r}, ours {b.error_fd!r}"


# Go's image-spec before 1.1 marshals ``variant`` right after ``architecture``; 1.1 (newest skopeo) puts it
# after ``os``/``os.version``/``os.features``. We follow 1.1, so an older skopeo's config bytes are moved
# to the newest order before comparing (nothing else changes), and a converted manifest then names them.
_OLD_VARIANT_ORDER = re.compile(
    rb',"variant":("(?:[^"\\]|\\.)*"),"os":("(?:[^"\\]|\\.)*")'
    rb'((?:,"os\.version":"(?:[^"\\]|\\.)*")?(?:,"os\.features":\[[^\]]*\])?)'
)


def to_image_spec_1_1(steps: list[Step]) -> list[Step]:
    """skopeo's transcript with configs in image-spec 1.1 field order (identity for a new skopeo)."""
    renamed: dict[bytes, bytes] = {}
    configs: dict[str, bytes] = {}
    for step in steps:
        if step.label == "GetFullConfig" and step.data is not None:
            new = _OLD_VARIANT_ORDER.sub(rb',"os":\2\3,"variant":\1', step.data)
            configs[step.label] = new
            if new != step.data:  # same length: only the order changes
                renamed[sha256(step.data).encode()] = sha256(new).encode()
    out = []
    for step in steps:
        data = configs.get(step.label, step.data)
        if step.label == "GetManifest" and data is not None:
            for old, new in renamed.items():
                data = data.replace(old, new)
        out.append(dataclasses.replace(step, data=data))
    return out


# ------------------------------------------------------------------------------------------ scenarios


def read_image(session: Session) -> None:
    """Initialize, open, every metadata call, every blob named by the manifest, close, shut down."""
    ref = session.extra["ref"]
    assert session.call("Initialize", "Initialize", [], compare_value=False)["success"]
    img = session.call("OpenImage", "OpenImage", [ref])["value"]
    manifest_step = session.piped("GetManifest", "GetManifest", [img])
    session.piped("GetConfig", "GetConfig", [img])
    session.piped("GetFullConfig", "GetFullConfig", [img])
    manifest = json.loads(manifest_step.data or b"{}")
    config = manifest.get("config", {})
    # A converted schema2 manifest names a re-serialized config the source does not have: skopeo fails
    # GetBlob of it, we serve it (by design); for OCI manifests both serve the stored config.
    converted = manifest_step.reply["value"] != sha256(manifest_step.data or b"")
    session.piped("GetBlob config", "GetBlob", [img, config.get("digest"), config.get("size")], compare=not converted)
    if original := session.extra.get("config"):
        session.piped("GetBlob original config", "GetBlob", [img, *original])
    for index, layer in enumerate(manifest.get("layers", [])):
        session.piped(f"GetBlob layer {index}", "GetBlob", [img, layer["digest"], layer["size"]])
    session.call("CloseImage", "CloseImage", [img])
    session.shutdown()


def expect_image(image: BuiltImage, *, converted: bool = False) -> Expectation:
    """Expectations for :func:`read_image` on a builder image (``converted``: schema2 shown as OCI)."""

    def check(steps: dict[str, Step], _: StandardImages) -> None:
        assert steps["Initialize"].reply["value"].startswith("0.2."), steps["Initialize"].reply
        opened = steps["OpenImage"].reply
        assert opened["success"] and opened["value"] == 1, f"{opened!r}"
        manifest = steps["GetManifest"]
        assert manifest.reply["success"] and manifest.reply["value"] == image.manifest_digest, f"{manifest.reply!r}"
        assert manifest.finish is not None and manifest.finish["success"], f"{manifest.finish!r}"
        assert manifest.data is not None
        doc = json.loads(manifest.data)
        assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        if converted:
            assert doc["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
            assert [x["digest"] for x in doc["layers"]] == [x.digest for x in image.layers]
        else:
            assert manifest.data == image.manifest
        full = json.loads(steps["GetFullConfig"].data or b"null")
        assert full["architecture"] == image.platform.architecture and full["os"] == image.platform.os
        assert full["rootfs"]["diff_ids"] == [x.diff_id for x in image.layers]
        assert json.loads(steps["GetConfig"].data or b"null") == full["config"]
        original = steps["GetBlob original config"]
        assert original.data == image.config and original.reply["value"] == image.config_size
        config = steps["GetBlob config"]
        if converted:
            # c/image re-serializes the config as OCI: the manifest names the GetFullConfig bytes, which
            # the source does not store. skopeo fails GetBlob of that digest; a server that passes this
            # check serves it, so a client can fetch the config the manifest it was given names.
            assert doc["config"]["digest"] == sha256(steps["GetFullConfig"].data or b"")
            assert doc["config"]["digest"] != image.config_digest
            # (tests/integration/test_server.py asserts that ours serves it)
            assert not config.compare
            if config.reply["success"]:
                assert config.data == steps["GetFullConfig"].data, f"{config.reply!r}"
                assert config.finish is not None and config.finish["success"], f"{config.finish!r}"
        else:
            assert config.data == image.config and config.reply["value"] == image.config_size
        for index, layer in enumerate(image.layers):
            step = steps[f"GetBlob layer {index}"]
            assert step.reply["value"] == layer.size and step.reply["pipeid"] != 0, f"{step.reply!r}"
            assert step.data is not None and sha256(step.data) == layer.digest and len(step.data) == layer.size
            assert step.finish is not None and step.finish["success"] and step.finish["error"] == "", f"{step.finish!r}"
        assert f"GetBlob layer {len(image.layers)}" not in steps
        assert steps["CloseImage"].reply["success"]
        assert steps["Shutdown"].reply["value"] == 0

    return check


def expect_docker_archive(steps: dict[str, Step], images: StandardImages) -> None:
    """docker-archive stores uncompressed layers: their digests are the builder's diff_ids."""
    source = images.single
    manifest = steps["GetManifest"]
    assert manifest.reply["success"] and manifest.data is not None, f"{manifest.reply!r}"
    doc = json.loads(manifest.data)
    assert [x["digest"] for x in doc["layers"]] == [x.diff_id for x in source.layers]
    for index in range(len(source.layers)):
        step = steps[f"GetBlob layer {index}"]
        assert step.data is not None and sha256(step.data) == source.layers[index].diff_id
        assert step.finish is not None and step.finish["success"], f"{step.finish!r}"
    full = json.loads(steps["GetFullConfig"].data or b"null")
    assert full["config"]["Env"] == list(SINGLE.env)
    assert steps["Shutdown"].reply["value"] == 0


def blob_verification(session: Session) -> None:
    """FinishPipe reports wrong sizes and digests; unknown blobs fail at once; the session goes on."""
    single = session.images.single
    big, small = single.layers[2], single.layers[0]
    session.call("Initialize", "Initialize", [], compare_value=False)
    img = session.call("OpenImage", "OpenImage", [single.ref])["value"]
    session.piped("size + 1", "GetBlob", [img, big.digest, big.size + 1])
    session.piped("size - 1", "GetBlob", [img, big.digest, big.size - 1])
    session.piped("size of another blob", "GetBlob", [img, small.digest, single.layers[1].size])
    session.piped("unknown digest", "GetBlob", [img, "sha256:" + "0" * 64, 10], compare_error=False)
    bad = session.call("OpenImage corrupted", "OpenImage", [session.extra["corrupted_ref"]])["value"]
    session.piped("corrupted", "GetBlob", [bad, big.digest, big.size])
    session.piped("corrupted, wrong size", "GetBlob", [bad, big.digest, big.size + 7])
    session.piped("still serving", "GetManifest", [img])
    session.shutdown()


def expect_blob_verification(steps: dict[str, Step], images: StandardImages) -> None:
    big, small = images.single.layers[2], images.single.layers[0]
    wanted = {
        "size + 1": f"expected {big.size + 1} bytes in blob, got {big.size}",
        "size - 1": f"expected {big.size - 1} bytes in blob, got {big.size}",
        "size of another blob": f"expected {images.single.layers[1].size} bytes in blob, got {small.size}",
        "corrupted": f"corrupted blob, expecting {big.digest}",
        "corrupted, wrong size": f"corrupted blob, expecting {big.digest}",  # the digest error wins
    }
    for label, error in wanted.items():
        step = steps[label]
        assert step.reply["success"] and step.reply["pipeid"] != 0, f"{step.reply!r}"
        assert step.finish is not None and not step.finish["success"], f"{step.finish!r}"
        assert step.finish["error"] == error, f"{step.finish!r}"
    unknown = steps["unknown digest"]
    assert not unknown.reply["success"] and unknown.finish is None and unknown.reply["pipeid"] == 0
    assert "0" * 64 in unknown.reply["error"], f"{unknown.reply!r}"
    assert steps["still serving"].reply["value"] == images.single.manifest_digest
    assert steps["Shutdown"].reply["value"] == 0


def early_close(session: Session) -> None:
    """A client that closes the data fd early gets ``write |1: broken pipe`` from FinishPipe."""
    big = session.images.big
    layer = big.layers[0]
    session.call("Initialize", "Initialize", [], compare_value=False)
    img = session.call("OpenImage", "OpenImage", [big.ref])["value"]
    _, reply, fds = session.proxy.call("GetBlob", [img, layer.digest, layer.size])
    assert len(fds) == 1, f"{reply!r}"
    try:
        first = session.proxy.read_some(fds[0], 4096)
    finally:
        close_fds(fds)
    session.record(Step("GetBlob", reply, data=first[:16]))
    session.call("FinishPipe", "FinishPipe", [reply["pipeid"]])
    session.piped("still serving", "GetManifest", [img])
    session.shutdown()


def expect_early_close(steps: dict[str, Step], images: StandardImages) -> None:
    layer = images.big.layers[0]
    assert steps["GetBlob"].reply["value"] == layer.size
    assert steps["GetBlob"].data == images.big.blob(layer.digest)[:16]
    finish = steps["FinishPipe"].reply
    assert not finish["success"] and finish["error"] == "write |1: broken pipe", f"{finish!r}"
    assert finish.get("error_code", "EPIPE") == "EPIPE", f"{finish!r}"
    assert steps["still serving"].reply["value"] == images.big.manifest_digest


def image_ids(session: Session) -> None:
    """Ids count up from 1 and are never reused; closed and unknown ids are ``no image N``."""
    single = session.images.single
    session.call("Initialize", "Initialize", [], compare_value=False)
    for n in (1, 2, 3):
        session.call(f"OpenImage {n}", "OpenImage", [single.ref])
    session.call("CloseImage 2", "CloseImage", [2])
    session.call("GetManifest closed", "GetManifest", [2])
    session.call("CloseImage 2 again", "CloseImage", [2])
    session.call("GetManifest unknown", "GetManifest", [77])
    session.call("GetBlob unknown", "GetBlob", [77, single.layers[0].digest, single.layers[0].size])
    session.piped("GetManifest 3", "GetManifest", [3])
    session.call("OpenImage 4", "OpenImage", [single.ref])
    missing = single.ref.rsplit(":", 1)[0] + ":no-such-tag"
    session.call("OpenImage missing tag", "OpenImage", [missing], compare_error=False)
    session.call("OpenImage missing layout", "OpenImage", ["oci:/nonexistent/layout:latest"], compare_error=False)
    session.call("OpenImage bad transport", "OpenImage", ["nosuchtransport:foo"], compare_error=False)
    session.shutdown()


def expect_image_ids(steps: dict[str, Step], images: StandardImages) -> None:
    for n in (1, 2, 3, 4):
        assert steps[f"OpenImage {n}"].reply["value"] == n
    assert steps["CloseImage 2"].reply["success"]
    for label, n in [("GetManifest closed", 2), ("CloseImage 2 again", 2), ("GetManifest unknown", 77)]:
        assert steps[label].reply["error"] == f"no image {n}", f"{steps[label].reply!r}"
    assert steps["GetBlob unknown"].reply["error"] == "no image 77"
    assert steps["GetManifest 3"].reply["value"] == images.single.manifest_digest
    missing = steps["OpenImage missing tag"].reply
    assert not missing["success"] and "no-such-tag" in missing["error"], f"{missing!r}"
    assert not steps["OpenImage missing layout"].reply["success"]
    assert not steps["OpenImage bad transport"].reply["success"]


def session_errors(session: Session) -> None:
    """Calls before Initialize, a second Initialize, malformed requests, unknown methods and pipes."""
    single = session.images.single
    session.call("OpenImage before Initialize", "OpenImage", [single.ref])
    session.call("GetManifest before Initialize", "GetManifest", [1])
    session.call("FinishPipe before Initialize", "FinishPipe", [5])
    session.call("Initialize", "Initialize", [], compare_value=False)
    session.call("Initialize again", "Initialize", [])
    session.call("Initialize null args", "Initialize", None)
    session.raw("malformed JSON", b"{not json", compare_error=False)
    session.raw("args not an array", b'{"method":"GetManifest","args":"1"}', compare_error=False)
    session.call("unknown method", "Nope", [])
    session.call("lowercase method", "initialize", [])
    session.call("unknown pipe", "FinishPipe", [99])
    session.call("string imgid", "GetManifest", ["1"], compare_error=False)
    session.call("no args", "GetManifest", [], compare_error=False)
    session.call("imgid zero", "GetManifest", [0], compare_error=False)
    session.call("GetBlob two args", "GetBlob", [1, single.layers[0].digest], compare_error=False)
    img = session.call("OpenImage", "OpenImage", [single.ref])["value"]
    session.piped("still serving", "GetManifest", [img])
    session.shutdown()


def expect_session_errors(steps: dict[str, Step], images: StandardImages) -> None:
    texts = {
        "OpenImage before Initialize": "client error: must invoke Initialize",
        "GetManifest before Initialize": "client error: must invoke Initialize",
        "FinishPipe before Initialize": "finishpipe: no active pipe 5",
        "Initialize again": "already initialized",
        "Initialize null args": "already initialized",
        "unknown method": "unknown method: Nope",
        "lowercase method": "unknown method: initialize",
        "unknown pipe": "finishpipe: no active pipe 99",
    }
    for label, error in texts.items():
        reply = steps[label].reply
        assert not reply["success"] and reply["error"] == error and reply["value"] is None, f"{reply!r}"
    for label in ("malformed JSON", "args not an array"):
        reply = steps[label].reply
        assert not reply["success"] and reply["error"].startswith("invalid request"), f"{reply!r}"
    for label in ("string imgid", "no args", "imgid zero", "GetBlob two args"):
        assert not steps[label].reply["success"], f"{steps[label].reply!r}"
    assert steps["OpenImage"].reply["value"] == 1
    assert steps["still serving"].reply["value"] == images.single.manifest_digest
    assert steps["Shutdown"].reply["value"] == 0


@dataclass(frozen=True)
class Case:
    scenario: Scenario
    expect: Expectation
    flags: tuple[str, ...] = AMD64
    ref: Callable[[StandardImages], str] | None = None
    sockfd_mode: SockfdMode = "stdin"
    image: Callable[[StandardImages], BuiltImage] | None = None  # a builder image: ref and config known


def image_case(
    pick: Callable[[StandardImages], BuiltImage],
    flags: tuple[str, ...],
    *,
    converted: bool = False,
    sockfd_mode: SockfdMode = "stdin",
) -> Case:
    def expect(steps: dict[str, Step], images: StandardImages) -> None:
        expect_image(pick(images), converted=converted)(steps, images)

    return Case(read_image, expect, flags, sockfd_mode=sockfd_mode, image=pick)


def copy_case(transport: str) -> Case:
    def expect(steps: dict[str, Step], images: StandardImages) -> None:
        if transport == "docker-archive":
            expect_docker_archive(steps, images)
        else:
            expect_image(images.single)(steps, images)

    same_blobs = transport != "docker-archive"  # docker-archive stores a new config and uncompressed layers
    return Case(
        read_image,
        expect,
        AMD64,
        ref=lambda images: images.copies[transport].ref,
        image=(lambda images: images.single) if same_blobs else None,
    )


CASES: dict[str, Case] = {
    "single": image_case(lambda i: i.single, AMD64),
    "single-sockfd3": image_case(lambda i: i.single, AMD64, sockfd_mode="fd3"),
    "nolayers": image_case(lambda i: i.nolayers, AMD64),
    "big": image_case(lambda i: i.big, AMD64),
    "multi-amd64": image_case(lambda i: i.multi.instances["amd64"], AMD64),
    "multi-arm64": image_case(lambda i: i.multi.instances["arm64"], ARM64),
    "multi-s390x": image_case(lambda i: i.multi.instances["s390x"], S390X),
    "v2s2": image_case(lambda i: i.v2s2, AMD64, converted=True),
    "v2list-amd64": image_case(lambda i: i.v2list.instances["amd64"], AMD64, converted=True),
    "v2list-arm64": image_case(lambda i: i.v2list.instances["arm64"], ARM64, converted=True),
    "dir": copy_case("dir"),
    "oci-archive": copy_case("oci-archive"),
    "docker-archive": copy_case("docker-archive"),
    "blob-verification": Case(blob_verification, expect_blob_verification),
    "early-close": Case(early_close, expect_early_close),
    "image-ids": Case(image_ids, expect_image_ids),
    "session-errors": Case(session_errors, expect_session_errors),
}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def corrupted_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The single-arch image in a layout of its own whose big layer has one byte flipped."""
    layout = build_oci_layout(tmp_path_factory.mktemp("corrupted") / "layout", {"latest": SINGLE})
    image = layout.images["latest"]
    assert isinstance(image, BuiltImage)
    blob = image.path / "blobs" / "sha256" / image.layers[2].digest.split(":", 1)[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return image.ref


@pytest.fixture(scope="session")
def skopeo_version(skopeo_proxy_argv: list[str]) -> str:
    """The protocol version skopeo's proxy announces (0.2.3 for Debian's skopeo 1.9.3)."""
    with ProxyProcess.spawn(skopeo_proxy_argv) as proxy:
        version = proxy.initialize()
        assert proxy.shutdown() == 0
    return version


def scenario_args(case: Case, images: StandardImages, corrupted: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"corrupted_ref": corrupted}
    if case.image is not None:
        image = case.image(images)
        extra.update(ref=image.ref, config=(image.config_digest, image.config_size))
    if case.ref is not None:
        extra["ref"] = case.ref(images)
    return extra


# ------------------------------------------------------------------------------------------ differential tests


@pytest.mark.parametrize("name", CASES)
def test_skopeo_reference(name: str, layouts: StandardImages, skopeo_proxy_argv: list[str], corrupted_ref: str):
    """The scenario on skopeo alone matches what the builder knows (validates scenario, harness, images)."""
    case = CASES[name]
    argv = [*skopeo_proxy_argv, *case.flags]
    steps, _ = run(case.scenario, argv, layouts, scenario_args(case, layouts, corrupted_ref), case.sockfd_mode)
    case.expect({step.label: step for step in steps}, layouts)


@pytest.mark.parametrize("name", CASES)
def test_ours_matches_skopeo(
    name: str,
    layouts: StandardImages,
    skopeo_proxy_argv: list[str],
    our_proxy_argv: list[str],
    corrupted_ref: str,
):
    case = CASES[name]
    extra = scenario_args(case, layouts, corrupted_ref)
    theirs, _ = run(case.scenario, [*skopeo_proxy_argv, *case.flags], layouts, extra, case.sockfd_mode)
    ours, received = run(case.scenario, [*our_proxy_argv, *case.flags], layouts, extra, case.sockfd_mode)
    assert_five_keys(received)
    case.expect({step.label: step for step in ours}, layouts)
    assert_transcripts_agree(to_image_spec_1_1(theirs), ours)


# ------------------------------------------------------------------------------------------ newer than skopeo


#: methods and the protocol version that introduced them
NEWER_METHODS = {
    "OpenImageOptional": "0.2.4",
    "GetLayerInfo": "0.2.5",
    "GetLayerInfoPiped": "0.2.7",
    "GetRawBlob": "0.2.8",
}


def newer_methods(session: Session) -> None:
    """OpenImageOptional, GetLayerInfo, GetLayerInfoPiped and GetRawBlob on builder images."""
    images = session.images
    single = images.single
    session.call("Initialize", "Initialize", [], compare_value=False)
    img = session.call("OpenImageOptional present", "OpenImageOptional", [single.ref])["value"]
    missing = single.ref.rsplit(":", 1)[0] + ":no-such-tag"
    session.call("OpenImageOptional missing tag", "OpenImageOptional", [missing])
    session.call("OpenImage missing tag", "OpenImage", [missing], compare_error=False)
    for name, image in [("single", single), ("v2s2", images.v2s2), ("nolayers", images.nolayers)]:
        ident = img if name == "single" else session.call(f"OpenImage {name}", "OpenImage", [image.ref])["value"]
        session.call(f"GetLayerInfo {name}", "GetLayerInfo", [ident])
        session.piped(f"GetLayerInfoPiped {name}", "GetLayerInfoPiped", [ident])
    for index, layer in enumerate(single.layers):
        reply, data, err = session.proxy.get_raw_blob(img, layer.digest)
        session.record(Step(f"GetRawBlob layer {index}", reply, data, error_fd=err))
    reply, data, err = session.proxy.get_raw_blob(img, single.config_digest)
    session.record(Step("GetRawBlob config", reply, data, error_fd=err))
    reply, data, err = session.proxy.get_raw_blob(img, "sha256:" + "0" * 64)
    session.record(Step("GetRawBlob unknown", reply, compare_error=False))
    big = session.call("OpenImage big", "OpenImage", [images.big.ref])["value"]
    _, reply, fds = session.proxy.call("GetRawBlob", [big, images.big.layers[0].digest])
    assert len(fds) == 2, f"{reply!r}"
    os.close(fds[0])  # the producer is blocked on a full pipe: its next write fails with EPIPE
    try:
        (err,) = session.proxy.read_to_eof(fds[1:])
    finally:
        os.close(fds[1])
    session.record(Step("GetRawBlob closed early", reply, error_fd=err))
    session.shutdown()


def expect_newer_methods(steps: dict[str, Step], images: StandardImages) -> None:
    single = images.single
    assert steps["OpenImageOptional present"].reply["value"] == 1
    optional = steps["OpenImageOptional missing tag"].reply
    assert optional["success"] and optional["value"] == 0, f"{optional!r}"
    assert not steps["OpenImage missing tag"].reply["success"]
    for name, image in [("single", single), ("v2s2", images.v2s2), ("nolayers", images.nolayers)]:
        infos = [layer.info() for layer in image.layers]
        inline = steps[f"GetLayerInfo {name}"].reply
        assert inline["success"] and inline["value"] == infos, f"{inline!r}"
        piped = steps[f"GetLayerInfoPiped {name}"]
        assert piped.reply["success"] and piped.reply["value"] is None and piped.reply["pipeid"] != 0, (
            f"{piped.reply!r}"
        )
        assert json.loads(piped.data or b"null") == infos and piped.finish is not None and piped.finish["success"]
    assert {x["media_type"] for x in steps["GetLayerInfo v2s2"].reply["value"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    blobs = [(f"GetRawBlob layer {i}", x.digest, x.size) for i, x in enumerate(single.layers)]
    for label, digest, size in [*blobs, ("GetRawBlob config", single.config_digest, single.config_size)]:
        step = steps[label]
        assert step.reply["success"] and step.reply["value"] == size and step.reply["pipeid"] == 0, f"{step.reply!r}"
        assert step.data is not None and sha256(step.data) == digest
        assert step.error_fd == b"", f"{step.error_fd!r}"
    unknown = steps["GetRawBlob unknown"].reply
    assert not unknown["success"] and unknown.get("error_code", "other") == "other", f"{unknown!r}"
    early = steps["GetRawBlob closed early"]
    assert early.reply["success"] and early.reply["value"] == images.big.layers[0].size
    assert json.loads(early.error_fd or b"null") == {"code": "EPIPE", "message": "write |1: broken pipe"}


def test_newer_methods_on_skopeo(layouts: StandardImages, skopeo_proxy_argv: list[str], skopeo_version: str):
    """skopeo either implements them as the notes say, or answers ``unknown method`` for each missing one."""
    supported = {m for m, since in NEWER_METHODS.items() if version_tuple(skopeo_version) >= version_tuple(since)}
    if supported == set(NEWER_METHODS):
        steps, _ = run(newer_methods, [*skopeo_proxy_argv, *AMD64], layouts, {})
        expect_newer_methods({step.label: step for step in steps}, layouts)
        return
    with ProxyProcess.spawn([*skopeo_proxy_argv, *AMD64]) as proxy:
        proxy.initialize()
        img = proxy.call_ok("OpenImage", [layouts.single.ref])
        args: dict[str, list[Any]] = {
            "OpenImageOptional": [layouts.single.ref],
            "GetLayerInfo": [img],
            "GetLayerInfoPiped": [img],
            "GetRawBlob": [img, layouts.single.config_digest],
        }
        for method in sorted(NEWER_METHODS.keys() - supported):
            _, reply, fds = proxy.call(method, args[method])
            close_fds(fds)
            assert reply["error"] == f"unknown method: {method}", f"{reply!r}"


def test_newer_methods_ours(
    layouts: StandardImages, our_proxy_argv: list[str], skopeo_proxy_argv: list[str], skopeo_version: str
):
    """Ours against the notes and the builder; against skopeo too when skopeo is new enough (>= 0.2.8)."""
    ours, received = run(newer_methods, [*our_proxy_argv, *AMD64], layouts, {})
    assert_five_keys(received)
    expect_newer_methods({step.label: step for step in ours}, layouts)
    if version_tuple(skopeo_version) >= version_tuple("0.2.8"):
        theirs, _ = run(newer_methods, [*skopeo_proxy_argv, *AMD64], layouts, {})
        assert_transcripts_agree(theirs, ours)


def test_ours_speaks_0_2_8_with_the_notes_error_texts(layouts: StandardImages, our_proxy_argv: list[str]):
    """Texts that changed since skopeo 1.9.3 (0.2.3), as the 0.2.8 server words them (notes §2-§3)."""
    digest = layouts.single.layers[0].digest
    with ProxyProcess.spawn([*our_proxy_argv, *AMD64]) as proxy:
        _, reply, _ = proxy.call("Initialize", [1])
        assert reply["error"] == "invalid request, expecting zero arguments", f"{reply!r}"
        assert proxy.initialize() == "0.2.8"
        img = proxy.call_ok("OpenImage", [layouts.single.ref])
        cases: list[tuple[str, list[Any], str]] = [
            ("GetManifest", [0], "invalid imageid value of zero"),
            ("GetManifest", ["1"], "expecting numeric, not string"),
            ("GetManifest", [2**53], "out of range integer for numeric"),
            ("GetBlob", [img, digest], "found 2 args, expecting (imgid, digest, size)"),
            ("GetRawBlob", [img], "found 1 args"),
        ]
        for method, args, text in cases:
            _, reply, fds = proxy.call(method, args)
            close_fds(fds)
            assert not reply["success"] and reply["error"].startswith(text), f"{method}{args}: {reply!r}"
            assert reply["error_code"] == "other", f"{reply!r}"
        assert_five_keys(proxy.received)
        assert proxy.shutdown() == 0


def test_skopeo_reply_keys_are_a_subset_of_ours(layouts: StandardImages, skopeo_proxy_argv: list[str]):
    """Old servers send success, value, pipeid, error (0.2.3); 0.2.8 adds error_code before error."""
    with ProxyProcess.spawn(skopeo_proxy_argv) as proxy:
        proxy.initialize()
        proxy.call("Nope", [])
        for raw in proxy.received:
            keys = reply_keys(raw)
            assert keys == [key for key in REPLY_KEYS if key in keys], raw
            assert {"success", "value", "pipeid", "error"} <= set(keys), raw
        assert proxy.shutdown() == 0


def test_harness_rejects_a_silent_server(tmp_path: Path):
    """A server that never answers fails the call within the timeout instead of hanging the test."""
    script = tmp_path / "silent.py"
    script.write_text("import sys\nsys.stdin.buffer.read()\n")
    with (
        ProxyProcess.spawn([sys.executable, str(script)], timeout=0.5) as proxy,
        pytest.raises(AssertionError, match="no reply within"),
    ):
        proxy.call("Initialize", [])


def test_harness_sees_early_exit(tmp_path: Path):
    with (
        ProxyProcess.spawn([sys.executable, "-c", "raise SystemExit(3)"], timeout=5) as proxy,
        pytest.raises(AssertionError, match=r"exited with 3|closed the socket|receive failed"),
    ):
        proxy.call("Initialize", [])
