"""Documents nested too deeply get a clear error naming them, never a RecursionError (issue 14).

One test per place the proxy reads JSON (or YAML, TOML) from outside: manifests and configs through a real
Session over a socketpair, index.json, the TOC of a partial layer, policy.json, registries.d, auth files and
registries.conf; and the shared check itself (proxy/common/jsonlimits.py) at its limit.
"""

from __future__ import annotations

import array
import json
import logging
import os
import re
import socket
from pathlib import Path

import pytest
import trio

from protocol.codec import decode_reply, encode_request
from protocol.messages import Reply, Request
from proxy.common import jsonlimits
from proxy.config.auth_files import CredentialSource
from proxy.config.errors import ConfigError
from proxy.config.registries_conf import parse_registries_conf
from proxy.image import gojson
from proxy.image import manifest as mf
from proxy.partial import toc
from proxy.policy import ImagePolicy
from proxy.policy.errors import PolicyFileError
from proxy.policy.policy_file import load_policy
from proxy.policy.registries_d import load_registries_d
from proxy.server.options import ProxyOptions
from proxy.server.session import serve_socket
from tests.unit.layouts import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, OCILayout, digest, dumps, gz, tar_bytes

LIMIT = jsonlimits.MAX_DEPTH
TOO_DEEP = f"JSON nested too deeply (over {LIMIT} levels)"
#: deep enough that json.loads plus a walk of the result used to exceed Python's recursion limit
DEPTH = 600


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --------------------------------------------------------------------------- the shared check


def test_json_depth_counts_arrays_and_objects_and_ignores_brackets_in_strings():
    assert jsonlimits.json_depth(b'"[[[{"') == 0
    assert jsonlimits.json_depth(b'{"a": [1, {"b": "]]]\\"[[["}], "c": {}}') == 3
    assert jsonlimits.json_depth('["\\\\", ["\\"]"]]') == 2
    assert jsonlimits.json_depth(b"[[]][[[]]]") == 3


def test_the_limit_is_inclusive():
    jsonlimits.check_json_depth(nested(LIMIT))
    with pytest.raises(jsonlimits.NestingError, match="^" + re.escape(TOO_DEEP) + "$"):
        jsonlimits.check_json_depth(nested(LIMIT + 1))
    assert jsonlimits.loads(nested(LIMIT)) is not None


def test_loads_checks_utf16_text_as_json_loads_reads_it():
    with pytest.raises(jsonlimits.NestingError):
        jsonlimits.loads(nested(LIMIT + 1).decode().encode("utf-16"))
    assert jsonlimits.loads('{"a": [1]}'.encode("utf-16")) == {"a": [1]}


def test_gojson_refuses_deep_input_before_parsing_it():
    with pytest.raises(gojson.GoJSONNestingError, match=re.escape(TOO_DEEP)):
        gojson.unmarshal(b'{"x":' + nested(DEPTH) + b"}", gojson.ANY)


def test_gojson_accepts_the_limit():
    value = gojson.unmarshal(nested(LIMIT), gojson.ANY)
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    assert depth == LIMIT


# --------------------------------------------------------------------------- manifests, configs, indexes


def deep_manifest(layout: OCILayout, field: str = "history") -> bytes:
    """A valid OCI manifest, plus an unknown field nested DEPTH deep (c/image's ambiguity check reads it)."""
    layer = gz(tar_bytes({"a": b"a"}))
    config = dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": layout.descriptor(OCI_CONFIG, config),
        "layers": [layout.descriptor(OCI_LAYER_GZIP, layer)],
    }
    return dumps(doc)[:-1] + f',"{field}":'.encode() + nested(DEPTH) + b"}"


def test_manifest_module_names_the_manifest_by_digest(tmp_path):
    raw = deep_manifest(OCILayout(tmp_path))
    for call in (
        lambda: mf.guess_mime_type(raw),
        lambda: mf.manifest_digest(raw),
        lambda: mf.parse_image_manifest(raw, mf.OCI_MANIFEST),
        lambda: mf.choose_instance(raw, mf.OCI_INDEX, mf.wanted_platforms()),
    ):
        with pytest.raises(mf.ManifestError, match=re.escape(f"{digest(raw)}: {TOO_DEEP}")):
            call()


def deep_config_image(layout: OCILayout) -> tuple[bytes, str]:
    """An image whose config blob has a deep unknown field; returns (manifest bytes, config digest)."""
    layer_tar = tar_bytes({"a": b"a"})
    config = dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]}}
    )
    config = config[:-1] + b',"x":' + nested(DEPTH) + b"}"
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": layout.descriptor(OCI_CONFIG, config),
        "layers": [layout.descriptor(OCI_LAYER_GZIP, gz(layer_tar))],
    }
    return dumps(doc), digest(config)


def options(tmp_path: Path) -> ProxyOptions:
    registries_d = tmp_path / "registries.d"
    registries_d.mkdir(exist_ok=True)
    return ProxyOptions(policy=ImagePolicy.from_flags(insecure=True, registries_d=str(registries_d)))


class Client:
    """The client end of a socketpair whose other end a Session serves in this process."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def call(self, method: str, *args: object) -> Reply:
        await self.sock.send(encode_request(Request(method, list(args))))
        data, ancdata, _, _ = await self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
        for level, kind, fds in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", fds[: len(fds) - len(fds) % 4]):
                    os.close(fd)
        return decode_reply(data)


async def with_session(tmp_path: Path, work) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_socket, theirs, options(tmp_path))
            with trio.socket.from_stdlib_socket(ours) as sock:
                client = Client(sock)
                assert (await client.call("Initialize")).success
                await work(client)
            # closing our end is EOF: the session ends, and so does the nursery


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert not logged, [r.getMessage() for r in logged]


async def test_open_image_of_a_deep_manifest_names_the_image(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    layout = OCILayout(tmp_path / "layout")
    raw = deep_manifest(layout)
    layout.add(layout.descriptor(OCI_MANIFEST, raw), tag="deep")
    ref = f"oci:{layout.root}:deep"

    async def work(client: Client) -> None:
        reply = await client.call("OpenImage", ref)
        assert not reply.success
        # "manifest" when the signature policy reads it first, "OCI image manifest" when parsed first
        expected = re.escape(f"{ref}: ") + "(OCI image )?" + re.escape(f"manifest {digest(raw)}: {TOO_DEEP}")
        assert re.fullmatch(expected, reply.error), reply.error

    await with_session(tmp_path, work)
    no_tracebacks(caplog)


async def test_open_image_of_a_deep_index_json_names_the_file(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    layout = OCILayout(tmp_path / "layout")
    _, desc = layout.image()
    layout.add(desc, tag="t")
    index = layout.root / "index.json"
    index.write_bytes(index.read_bytes()[:-1] + b',"x":' + nested(DEPTH) + b"}")
    ref = f"oci:{layout.root}:t"

    async def work(client: Client) -> None:
        reply = await client.call("OpenImage", ref)
        assert not reply.success
        assert reply.error == f"{ref}: parsing {index}: {TOO_DEEP}"

    await with_session(tmp_path, work)
    no_tracebacks(caplog)


async def test_get_config_of_a_deep_config_names_the_config(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    layout = OCILayout(tmp_path / "layout")
    raw, config_digest = deep_config_image(layout)
    layout.add(layout.descriptor(OCI_MANIFEST, raw), tag="deep")
    ref = f"oci:{layout.root}:deep"

    async def work(client: Client) -> None:
        opened = await client.call("OpenImage", ref)
        assert opened.success, opened.error
        for method in ("GetConfig", "GetFullConfig"):
            reply = await client.call(method, opened.value)
            assert not reply.success
            assert f"image config {config_digest}: {TOO_DEEP}" in reply.error
            assert "internal error" not in reply.error

    await with_session(tmp_path, work)
    no_tracebacks(caplog)


# --------------------------------------------------------------------------- TOCs


def test_a_deep_toc_is_a_toc_error():
    with pytest.raises(toc.TocError, match="^" + re.escape(f"the TOC is {TOO_DEEP}") + "$"):
        toc.tar_split_digest(b'{"version":1,"entries":' + nested(DEPTH) + b"}")
    assert toc.tar_split_digest(b'{"version":1,"entries":[{"xattrs":{"a":"b"}}]}') is None


# --------------------------------------------------------------------------- configuration files


def test_a_deep_policy_file_names_the_file(tmp_path):
    path = tmp_path / "policy.json"
    path.write_bytes(b'{"default":[{"type":"insecureAcceptAnything"}],"x":' + nested(DEPTH) + b"}")
    with pytest.raises(PolicyFileError) as raised:
        load_policy(str(path))
    assert str(raised.value) == f'invalid policy in "{path}": {TOO_DEEP}'


def test_a_deep_registries_d_file_names_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("docker:\n  example.com:\n    lookaside: " + "[" * DEPTH + "]" * DEPTH + "\n")
    with pytest.raises(PolicyFileError) as raised:
        load_registries_d(str(tmp_path))
    assert str(raised.value) == f"parsing {tmp_path / 'a.yaml'}: YAML nested too deeply (over {LIMIT} levels)"


def test_a_deep_block_style_registries_d_file_is_refused(tmp_path):
    text = "docker:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(LIMIT + 1)) + "  " * (LIMIT + 2) + "x: 1\n"
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(PolicyFileError, match="YAML nested too deeply"):
        load_registries_d(str(tmp_path))


def test_a_deep_auth_file_names_the_file(tmp_path):
    path = tmp_path / "auth.json"
    path.write_bytes(b'{"auths":{"quay.io":{"auth":"dTpw"}},"x":' + nested(DEPTH) + b"}")
    source = CredentialSource.from_options(authfile=path, environ={})
    with pytest.raises(ConfigError) as raised:
        source.lookup("quay.io")
    assert f'reading JSON file "{path}": {TOO_DEEP}' in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * DEPTH + "]" * DEPTH,  # tomllib recurses: RecursionError without the check
        "x = " + "[" * (LIMIT + 1) + "]" * (LIMIT + 1),
        ".".join(f"k{i}" for i in range(LIMIT + 1)) + " = 1",  # dotted keys nest without recursing
    ],
)
def test_a_deep_registries_conf_names_the_file(text):
    with pytest.raises(ConfigError) as raised:
        parse_registries_conf(text, "/etc/containers/registries.conf")
    where = 'loading registries configuration "/etc/containers/registries.conf"'
    assert str(raised.value) == f"{where}: TOML nested too deeply (over {LIMIT} levels)"


def test_json_still_parses_below_the_limit():
    doc = json.loads(dumps({"a": [[{"b": 1}]]}))
    assert jsonlimits.loads(dumps(doc)) == doc
