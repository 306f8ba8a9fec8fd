"""Hostile requests for the image-proxy protocol, and a client that sends them and accounts for every reply.

:func:`generate` is deterministic from its seed and returns exactly ``count`` raw request packets: first the
systematic cases (every wrong type for every argument of every method in ``protocol.methods.METHODS``, every
wrong argument count, hostile digests, references, request ids, Unicode, oversize and truncated packets, deep
nesting, invalid JSON and UTF-8, unknown methods, images and pipes), shuffled, then random mutations of them.
Each :class:`Hostile` says what the daemon must do with it: answer it exactly once (always, here: nothing
generated decodes to ``Shutdown``, and no packet is empty, which a SOCK_SEQPACKET server cannot tell from the
end of the connection), with a failure when ``must_fail``, and with which request id (what the codec reads
from the packet). :func:`drive` sends packets over one connection and checks exactly that.

What a request may do is bounded by the :class:`Target` it is built for (the images open on the connection):
nothing generated closes those images, and no FinishPipe names a pipe id a daemon could have handed out (pipe
ids are its fd numbers: only 0 to 2 and ids from 2^20 up are used), so no generated FinishPipe waits for a
pipe nobody reads.

:func:`connect_as` connects to a daemon as another user (the daemon reads SO_PEERCRED at connect time), so a
hostile client can be a real neighbour: its own uid, its own per-user limits. :func:`fifo_images` makes local
images with FIFOs where files are expected (a blob, an index.json, a ``dir:`` manifest).
"""

from __future__ import annotations

import array
import collections
import json
import math
import os
import random
import shutil
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from protocol.codec import MAX_MSG_SIZE, MAX_SAFE_INTEGER, decode_reply, decode_request
from protocol.errors import ProtocolViolation
from protocol.messages import Reply, Request
from protocol.methods import METHODS, MethodSpec, Param

#: pipe ids no daemon hands out (its fds 0-2, and numbers beyond any fd table): FinishPipe of these never waits
SAFE_PIPE_IDS = (0, 1, 2, 1 << 20, (1 << 31) - 1, 1 << 32, MAX_SAFE_INTEGER)
#: image ids no connection reaches (ids count up from 1 per connection)
UNKNOWN_IMAGE_IDS = (0, 1_000_000, 1 << 31, 1 << 32, MAX_SAFE_INTEGER)
#: the largest packet sent (a unix socket's default send buffer is 208 KiB)
MAX_PACKET = 100_000

HEX64 = "0123456789abcdef" * 4


@dataclass(frozen=True)
class Target:
    """What the hostile requests are built around: an image open on the connection and one of its blobs (small),
    and local paths the test prepared (a FIFO, a directory the client may not read, ...)."""

    image_id: int
    digest: str
    size: int
    #: hostile local references (e.g. ``oci:<fifo>``) on top of the built-in ones
    references: tuple[str, ...] = ()
    #: a port on 127.0.0.1 where nothing listens (connection refused)
    closed_port: int = 1


@dataclass(frozen=True)
class Hostile:
    """One request packet and what its reply must be."""

    packet: bytes
    kind: str
    #: the reply must say ``success: false``
    must_fail: bool
    #: the id its reply carries (None: an in-order reply), as the server's codec reads the packet
    request_id: int | None


def _decode(packet: bytes) -> Request | ProtocolViolation:
    return decode_request(packet[: MAX_MSG_SIZE + 1], truncated=len(packet) > MAX_MSG_SIZE + 1)


def _request_id(packet: bytes) -> int | None:
    decoded = _decode(packet)
    return decoded.id if isinstance(decoded, Request) else decoded.request_id


def _answered(packet: bytes) -> bool:
    """Whether a server must answer this packet: anything but Shutdown (and the empty packet, which is EOF)."""
    if not packet:
        return False
    decoded = _decode(packet)
    return not (isinstance(decoded, Request) and decoded.method == "Shutdown")


def dumps(doc: Any, ascii_only: bool = True) -> bytes:
    """JSON text as a client might write it: lone surrogates as ``\\udXXX`` escapes (``ascii_only``), or written
    raw with ``surrogatepass`` (invalid UTF-8); NaN and Infinity as Python writes them (not JSON, but Python's
    decoder reads them)."""
    text = json.dumps(doc, ensure_ascii=ascii_only, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def request(method: Any, args: Any = (), *, request_id: Any = None, ascii_only: bool = True, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"method": method, "args": list(args) if isinstance(args, tuple) else args}
    if request_id is not None:
        doc["id"] = request_id
    doc.update(extra)
    return dumps(doc, ascii_only)


# ---------------------------------------------------------------------------------------------- values

#: values of every JSON type, and numbers every way they can be wrong; none is a pipe id a daemon hands out
#: (SAFE_PIPE_IDS) nor an open image id
WRONG_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    -1,
    -(2**63),
    0.5,
    -0.0,
    1.5,
    MAX_SAFE_INTEGER + 1,
    2**64,
    10**30,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "1",
    "NaN",
    "Infinity",
    "-1",
    "0x10",
    "1e3",
    "\udcff",
    "\ud800",
    "\x00",
    "sha256:",
    [],
    [1],
    [[1, 1]],
    {},
    {"a": 1},
    [[[[]]]],
    "x" * 5000,
)

#: characters a client may put in any string: controls, NUL, lone surrogates (both halves), noncharacters,
#: the BOM, bidi overrides, combining marks, astral planes, U+10FFFF
ODD_CHARACTERS = (
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\x85",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udcff",
    "\ufffd",
    "\ufffe",
    "\uffff",
    "\ufeff",
    "\u202e",
    "\u200b",
    "\u0301",
    "\u2028",
    "\U0001f600",
    "\U0010ffff",
    "\u0660",
    "/",
    "\\",
    "..",
    "%00",
    "\n",
    '"',
)

HOSTILE_DIGESTS = (
    "sha256:../../etc/passwd",
    "sha256:" + "../" * 21 + "x",
    "sha256:" + HEX64.upper(),
    "SHA256:" + HEX64,
    "sha256:" + HEX64[:63],
    "sha256:" + HEX64 + "0",
    "sha256:",
    "sha256",
    ":",
    ":" + HEX64,
    "sha512:" + HEX64,
    "sha512:" + HEX64 * 2 + "0",
    "sha384:" + HEX64[:48] * 2,
    "md5:" + HEX64[:32],
    "blake3:" + HEX64,
    "sha256+b64u:" + HEX64,
    "sha256:" + "g" * 64,
    "sha256:" + "\u0660" * 64,
    "sha256:" + HEX64 + "\x00",
    "sha256:" + HEX64 + "/..",
    "sha256: " + HEX64,
    "sha256:\udcff" + HEX64[:63],
    "sha256:" + HEX64 + "\n",
    "sha256:" + "0" * 64,  # well formed, in no image
    "sha512:" + "0" * 128,  # well formed, in no image
    "sha256:" + "f" * 64 * 100,
)


def hostile_references(target: Target) -> tuple[str, ...]:
    """References that must fail without hanging, reading forever or touching the network beyond 127.0.0.1. No
    ``docker://`` reference here names a host a resolver would look up (a name without a registry host would go
    to docker.io): only IP literals, ``localhost``, or names invalid before any lookup."""
    closed = f"127.0.0.1:{target.closed_port}"
    return (
        *target.references,
        "oci:/dev/zero",
        "oci:/dev/null:tag",
        "oci:/proc/self/fd/0",
        "oci:/proc/self/root",
        "oci:/proc/self/mem",
        "oci:/proc/kmsg",
        "oci:/etc/passwd",
        "oci:/",
        "oci:/etc",
        "oci:/tmp/../../../../etc",
        "oci:../../etc",
        "oci:relative/path",
        "oci:",
        "oci:/tmp/no-such-layout:" + "t" * 300,
        "oci:/tmp/no-such-layout@-1",
        "oci:/tmp/no-such-layout@99999999999999999999",
        "dir:/",
        "dir:/proc",
        "dir:/proc/self",
        "dir:/dev",
        "dir:",
        "oci-archive:/dev/urandom",
        "oci-archive:/dev/zero",
        "oci-archive:/proc/self/fd/0",
        "oci-archive:/",
        "docker-archive:/dev/zero",
        "docker-archive:/dev/urandom:x:latest",
        "docker-archive:/etc/passwd",
        f"docker://{closed}/x",
        f"docker://{closed}/x:latest",
        f"docker://{closed}/x@sha256:{'0' * 64}",
        f"docker://user:secret@{closed}/x",
        "docker://[::1]:1/x",
        "docker://localhost:1/x",
        "docker://127.0.0.1:0/x",
        "docker://127.0.0.1:65536/x",
        "docker://127.0.0.1:99999999999999999999/x",
        "docker://127.0.0.1:1:1/x",
        "docker://127.0.0.1:-1/x",
        "docker://[::1/x",
        "docker:///x",
        "docker://",
        "docker:",
        f"docker://{closed}/UPPER",
        f"docker://{closed}/x:" + "t" * 200,
        f"docker://{closed}/" + "a" * 4000,
        f"docker://{closed}/" + "a/" * 1000 + "b",
        f"docker://{closed}/x@sha256:../../etc/passwd",
        "docker://" + "a" * 300 + ".:1/x",
        f"docker://{closed}/\udcff",
        f"docker://{closed}/x\x00y",
        "docker://127.0.0.1\u2215x/y",
        "containers-storage:x",
        "docker-daemon:x:latest",
        "ostree:x",
        "sif:/dev/zero",
        "tarball:/dev/zero",
        "unknown:x",
        ":",
        "",
        "\x00",
        "x" * 4097,
    )


def _valid_value(param: Param, target: Target) -> Any:
    return {
        Param.IMAGE_ID: target.image_id,
        Param.PIPE_ID: 0,
        Param.DIGEST: target.digest,
        Param.SIZE: target.size,
        Param.IMAGE_REF: f"docker://127.0.0.1:{target.closed_port}/x",
        Param.RANGES: [[0, 1]],
        Param.SETTINGS: {},
    }[param]


def _is_uint(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value) or not value.is_integer()):
        return False
    return 0 <= value <= MAX_SAFE_INTEGER


def _must_fail_with(spec: MethodSpec, index: int, value: Any, target: Target) -> bool:
    """Whether ``spec`` with ``value`` as its argument ``index`` (the others valid) must fail. Only cases no
    reading of the protocol could accept: a wrong JSON type, a number no uint can be, a reference or digest the
    syntax refuses."""
    param = spec.params[index]
    if param in (Param.IMAGE_ID, Param.PIPE_ID, Param.SIZE):
        if not _is_uint(value):
            return True
        if param is Param.IMAGE_ID:
            return int(value) != target.image_id  # a number, but no open image
        # a pipe id: SAFE_PIPE_IDS and beyond, never an open pipe; a size may be wrong and still be answered (with
        # a pipe whose FinishPipe fails)
        return param is Param.PIPE_ID
    if param is Param.DIGEST:
        return not (isinstance(value, str) and value == target.digest)
    if param is Param.IMAGE_REF:
        return True  # nothing here names an image that exists
    if param is Param.RANGES:
        return not (isinstance(value, list) and value and all(isinstance(r, list) and len(r) == 2 for r in value))
    if param is Param.SETTINGS:
        return value != {}  # an empty settings object is the only valid one here (it may still come too late)
    raise AssertionError(param)


# ---------------------------------------------------------------------------------------------- systematic cases


def _case(packet: bytes, kind: str, must_fail: bool) -> Hostile:
    return Hostile(packet, kind, must_fail, _request_id(packet))


def _methods() -> list[MethodSpec]:
    """Every method but Shutdown (which ends the connection and is never answered)."""
    return [spec for spec in METHODS.values() if spec.replies]


def wrong_types(target: Target) -> list[Hostile]:
    """Every value of WRONG_VALUES as every argument of every method, the other arguments valid."""
    cases = []
    for spec in _methods():
        valid = [_valid_value(p, target) for p in spec.params]
        for index, param in enumerate(spec.params):
            for value in WRONG_VALUES:
                args = list(valid)
                args[index] = value
                must_fail = _must_fail_with(spec, index, value, target)
                cases.append(_case(request(spec.name, args), f"wrong-type {spec.name} {param.value}", must_fail))
    return cases


def wrong_counts(target: Target) -> list[Hostile]:
    """Every method with too few and too many arguments, and with ``args`` missing, null or not an array."""
    cases = []
    for spec in _methods():
        valid = [_valid_value(p, target) for p in spec.params]
        for count in range(len(spec.params) + 3):
            if count == len(spec.params):
                continue
            args = [*valid, "extra", 7, None][:count]
            cases.append(_case(request(spec.name, args), f"wrong-count {spec.name} {count}", True))
        takes_none = not spec.params
        cases.append(_case(dumps({"method": spec.name}), f"no-args {spec.name}", not takes_none))
        cases.append(_case(dumps({"method": spec.name, "args": None}), f"null-args {spec.name}", not takes_none))
        for args in ("x", 1, {}, True, {"0": target.image_id}):
            cases.append(_case(dumps({"method": spec.name, "args": args}), f"args-not-array {spec.name}", True))
    # Initialize is answered "already initialized" once a connection is initialized
    cases.append(_case(request("Initialize"), "initialize-again", True))
    return cases


def unknown_methods() -> list[Hostile]:
    names: list[Any] = [
        "",
        "shutdown",
        "SHUTDOWN",
        "Shutdown ",
        " Shutdown",
        "Shutdown\x00",
        "Shut\u200bdown",
        "Initialize\u0000",
        "getblob",
        "GetBlob\n",
        "__init__",
        "__class__",
        "handle",
        "_methods",
        "aclose",
        "open_image",
        "finish_pipe",
        "__proto__",
        "constructor",
        "../GetBlob",
        "GetBlob" * 1000,
        "\udcff",
        "\ud800GetBlob",
        "\U0010ffff",
        "".join(ODD_CHARACTERS),
    ]
    cases = [_case(request(name), "unknown-method", True) for name in names]
    for method in (None, 1, 1.5, True, [], {}, ["GetBlob"], {"GetBlob": 1}):
        cases.append(_case(dumps({"method": method, "args": []}), "method-not-string", True))
    cases.append(_case(dumps({"args": []}), "no-method", True))
    cases.append(_case(dumps({}), "empty-object", True))
    return cases


def unknown_ids(target: Target) -> list[Hostile]:
    cases = []
    for image_id in UNKNOWN_IMAGE_IDS:
        for spec in _methods():
            if spec.params and spec.params[0] is Param.IMAGE_ID:
                args = [image_id] + [_valid_value(p, target) for p in spec.params[1:]]
                cases.append(_case(request(spec.name, args), f"unknown-image {spec.name}", True))
    for pipe_id in SAFE_PIPE_IDS:
        cases.append(_case(request("FinishPipe", [pipe_id]), "unknown-pipe", True))
    return cases


def digests(target: Target) -> list[Hostile]:
    cases = []
    for digest in HOSTILE_DIGESTS:
        for method, extra in (
            ("GetBlob", [target.size]),
            ("GetRawBlob", []),
            ("GetBlobAt", [[[0, 1]]]),
            ("GetLayerTOC", []),
            ("GetLayerTarSplit", []),
        ):
            packet = request(method, [target.image_id, digest, *extra])
            cases.append(_case(packet, f"digest {method}", True))
    return cases


def references(target: Target) -> list[Hostile]:
    cases = []
    for ref in hostile_references(target):
        for method in ("OpenImage", "OpenImageOptional"):
            cases.append(_case(request(method, [ref]), f"reference {method}", True))
    return cases


def ranges(target: Target) -> list[Hostile]:
    """GetBlobAt's third argument, every way it can be wrong (and some ways it is right, but outside the blob)."""
    bad: list[Any] = [
        [],
        [[0]],
        [[0, 1, 2]],
        [[0, 0]],
        [[-1, 1]],
        [[0, -1]],
        [[0, (1 << 30) + 1]],
        [[MAX_SAFE_INTEGER, 1]],
        [[0.5, 1]],
        [["0", "1"]],
        [[None, None]],
        [{"offset": 0, "length": 1}],
        [[0, 1]] * 1025,
        "0-1",
        [[float("nan"), 1]],
    ]
    cases = [_case(request("GetBlobAt", [target.image_id, target.digest, r]), "ranges", True) for r in bad]
    outside = [[target.size + 10, 5]], [[0, target.size + 1]], [[target.size, 1]]
    for r in outside:  # valid syntax: answered with a pipe whose FinishPipe fails, or refused at once
        cases.append(_case(request("GetBlobAt", [target.image_id, target.digest, r]), "ranges-outside", False))
    return cases


def request_ids(target: Target) -> list[Hostile]:
    cases = []
    for request_id in (-1, -(2**53), MAX_SAFE_INTEGER + 1, 2**64, 10**400, 7.5, "7", True, None, [7], {"id": 7}):
        packet = dumps({"method": "GetCapabilities", "args": [], "id": request_id})
        cases.append(_case(packet, "bad-id", True))
        cases.append(_case(dumps({"method": "Shutdown", "args": [], "id": request_id}), "bad-id shutdown", True))
    # valid ids, each request twice: the second may find the first in flight ("already in use"), or not. Each id
    # with one request only: replies with ids come in any order, and the tally matches the replies of one id in
    # sending order, which is right only when the requests sharing an id are the same request
    ids = {
        "GetCapabilities": ([], False, (0, 7.0, MAX_SAFE_INTEGER)),
        "GetManifest": ([UNKNOWN_IMAGE_IDS[1]], True, (8, 424242, MAX_SAFE_INTEGER - 1)),
        "OpenImage": ([f"docker://127.0.0.1:{target.closed_port}/ids"], True, (9.0, 424243, 1)),
    }
    for method, (args, fails, request_ids_used) in ids.items():
        for request_id in request_ids_used:
            packet = request(method, args, request_id=request_id)
            cases.append(_case(packet, f"id {method}", fails))
            cases.append(_case(packet, f"duplicate-id {method}", fails))
    # an invalid request with a valid id: its error carries the id
    cases.append(_case(request("NoSuchMethod", request_id=99), "id unknown-method", True))
    cases.append(_case(request("GetBlob", ["x"], request_id=98), "id wrong-args", True))
    return cases


def unicode_strings(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        length = rng.randint(1, 40)
        chars = []
        for _ in range(length):
            pick = rng.random()
            if pick < 0.4:
                chars.append(rng.choice(ODD_CHARACTERS))
            elif pick < 0.7:
                chars.append(chr(rng.randint(0x20, 0x7E)))
            else:
                chars.append(chr(rng.randint(0x80, 0x10FFFF)))
        out.append("".join(chars))
    return out


def unicode(target: Target, rng: random.Random) -> list[Hostile]:
    """Any Unicode, lone surrogates (as JSON escapes, and raw, which is invalid UTF-8) and NUL, in every string a
    request has."""
    cases = []
    closed = f"127.0.0.1:{target.closed_port}"
    for text in unicode_strings(rng, 60):
        for ascii_only in (True, False):
            raw = not ascii_only and any("\ud800" <= c <= "\udfff" for c in text)
            kind = "unicode raw-surrogate" if raw else "unicode"
            cases.append(_case(request(text, ascii_only=ascii_only), f"{kind} method", True))
            for ref in (f"oci:/tmp/{text}", f"dir:/tmp/{text}", f"docker://{closed}/{text}", text):
                cases.append(_case(request("OpenImage", [ref], ascii_only=ascii_only), f"{kind} reference", True))
            digest = f"sha256:{text}"
            cases.append(_case(request("GetBlob", [target.image_id, digest, 1], ascii_only=ascii_only), kind, True))
            # an unknown key is ignored: answered like GetCapabilities, unless the packet is not UTF-8
            packet = dumps({"method": "GetCapabilities", "args": [], text: text}, ascii_only)
            cases.append(_case(packet, f"{kind} key", not isinstance(_decode(packet), Request)))
    return cases


def oversize(target: Target) -> list[Hostile]:
    """Strings over the reference limit; packets of exactly the limit (valid), one byte over, and far over (which
    the kernel truncates); valid requests cut short."""
    cases = []
    for length in (4096, 4097, 8000, 30000):
        ref = "oci:/tmp/" + "a" * (length - len("oci:/tmp/"))
        cases.append(_case(request("OpenImage", [ref]), f"long-reference {length}", True))
    base = b'{"method":"GetCapabilities","args":[]'
    for total in (MAX_MSG_SIZE, MAX_MSG_SIZE + 1, MAX_MSG_SIZE + 2, 40_000, 65_536, MAX_PACKET):
        packet = base + b" " * (total - len(base) - 1) + b"}"
        cases.append(_case(packet, f"packet {total}", total > MAX_MSG_SIZE))
        padded = request("OpenImage", ["oci:/tmp/" + "p" * (total - 40)])[:total]
        cases.append(_case(padded, f"oversize-truncated {total}", True))
    valid = request("GetBlob", [target.image_id, target.digest, target.size])
    for cut in (1, 2, 10, len(valid) // 2, len(valid) - 1):
        cases.append(_case(valid[:cut], "truncated", True))
    return cases


def nesting() -> list[Hostile]:
    """Arrays and objects thousands of levels deep, everywhere a request has a value."""
    cases = []
    for depth in (100, 500, 900, 990, 1000, 1100, 5000, 16000):
        arrays = "[" * depth + "]" * depth
        objects = '{"a":' * depth + "1" + "}" * depth
        for nested in (arrays, objects):
            for text in (
                nested,
                '{"method":"OpenImage","args":[' + nested + "]}",
                '{"method":"OpenImage","args":' + nested + "}",
                '{"method":"GetBlobAt","args":[1,"sha256:' + HEX64 + '",[' + nested + "]]}",
                '{"method":"GetCapabilities","args":[],"id":' + nested + "}",
                '{"method":' + nested + ',"args":[]}',
                '{"method":"GetCapabilities","args":[],"x":' + nested + "}",
            ):
                packet = text.encode()
                if len(packet) > MAX_PACKET:
                    continue
                # an unknown key nested shallowly enough to decode is ignored (how deep decodes depends on the
                # server's stack): answered, successfully or not
                ignored = text.endswith(',"x":' + nested + "}")
                cases.append(_case(packet, f"nesting {depth}", not ignored))
    return cases


INVALID_JSON = (
    b"{",
    b"}",
    b"[",
    b"null",
    b"true",
    b"0",
    b"-0",
    b'""',
    b"[]",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e99999",
    b"9" * 5000,
    b'{"method":"GetCapabilities","args":[]} {}',
    b'{"method":"GetCapabilities","args":[]}\x00',
    b'{"method":"GetCapabilities","args":[],}',
    b"{'method':'GetCapabilities','args':[]}",
    b'{"method":"GetCapabilities" "args":[]}',
    b'{"method":"GetCapabilities","args":[1 2]}',
    b'{"method":"GetCapabilities","args":[01]}',
    b'{"method":"GetBlob","args":[1,"sha256:' + HEX64.encode() + b'",' + b"9" * 5000 + b"]}",
    b'{"method":"Get\\uXXXXBlob","args":[]}',
    b'{"method":"GetCapabilities","args":[],"id":1e400}',
    b'{"method":"GetCapabilities","args":[],"id":-0}',
    b'{"method":"GetCapabilities","args":[],"id":0.0000000000000000001}',
    b'{"method":"\x00","args":[]}',
    b'{"method":"a\nb","args":[]}',
    b"\xef\xbb\xbf" + b'{"method":"GetCapabilities","args":[]}',
    b"\x00" * 100,
    b" " * 1000,
    b"\n",
)

INVALID_UTF8 = (
    b'{"method":"\xff","args":[]}',
    b'{"method":"GetCapabilities","args":["\xc0\xaf"]}',
    b'{"method":"OpenImage","args":["oci:/tmp/\xed\xa0\x80"]}',
    b'{"method":"OpenImage","args":["oci:/tmp/\xed\xb3\xbf"]}',
    b'{"method":"OpenImage","args":["oci:/tmp/\xf4\x90\x80\x80"]}',
    b'{"method":"OpenImage","args":["oci:/tmp/\xf8\x88\x80\x80\x80"]}',
    b'{"method":"OpenImage","args":["oci:/tmp/\xe2\x82"]}',
    b'{"method":"GetCapabilities","args":[]}\xe2',
    b"\xfe\xff\x00{\x00}",
    b"\xff\xfe{\x00}\x00",
)


def malformed() -> list[Hostile]:
    cases = []
    for packet in INVALID_JSON:
        decoded = _decode(packet)
        # a few look malformed and are not (``"id": -0`` is id 0); those must merely be answered
        cases.append(_case(packet, "invalid-json", not isinstance(decoded, Request)))
    cases += [_case(packet, "invalid-utf8", True) for packet in INVALID_UTF8]
    return cases


#: ids given to requests that reach for the network (see ``_with_ids``)
NETWORK_IDS_FROM = 1_000_000_000


def _with_ids(cases: list[Hostile]) -> list[Hostile]:
    """Requests that reach for a registry (``docker://`` to a closed port: the daemon tries a few times, seconds in
    all) get a request id, so that they run beside the others instead of holding up the in-order stream."""
    out = []
    for index, case in enumerate(cases):
        decoded = _decode(case.packet)
        if (
            isinstance(decoded, Request)
            and decoded.id is None
            and b"docker://" in case.packet
            and case.packet.startswith(b"{")
        ):
            packet = b'{"id":%d,' % (NETWORK_IDS_FROM + index) + case.packet[1:]
            case = Hostile(packet, case.kind, case.must_fail, _request_id(packet))
        out.append(case)
    return out


def systematic(target: Target, seed: int = 0) -> list[Hostile]:
    """Every systematic case, in a fixed order."""
    rng = random.Random(f"hostile-unicode-{seed}")
    return _with_ids(
        [
            *wrong_types(target),
            *wrong_counts(target),
            *unknown_methods(),
            *unknown_ids(target),
            *digests(target),
            *references(target),
            *ranges(target),
            *request_ids(target),
            *unicode(target, rng),
            *oversize(target),
            *nesting(),
            *malformed(),
        ]
    )


# ---------------------------------------------------------------------------------------------- random mutations


def _mutate(rng: random.Random, packet: bytes) -> bytes:
    """One random byte-level change: flip, insert, delete, cut, duplicate, or splice odd bytes in."""
    data = bytearray(packet)
    op = rng.randrange(6)
    pos = rng.randrange(len(data) + 1)
    if op == 0 and data:
        data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
    elif op == 1:
        data[pos:pos] = bytes([rng.randrange(256)])
    elif op == 2 and data:
        del data[min(pos, len(data) - 1)]
    elif op == 3:
        del data[max(1, pos) :]
    elif op == 4:
        end = min(len(data), pos + rng.randint(1, 64))
        data[pos:pos] = data[pos:end] * rng.randint(1, 8)
    else:
        data[pos:pos] = rng.choice((b"\\udcff", b"\\u0000", b"\xff", b"\xed\xa0\x80", b"[", b"{", b'"', b"\\"))
    return bytes(data[:MAX_PACKET])


def generate(seed: int, count: int, target: Target) -> list[Hostile]:
    """``count`` hostile requests for ``target``, the same for the same seed: the systematic cases shuffled, then
    random mutations of them (cut to ``count``). Nothing returned is Shutdown, nor an empty packet."""
    rng = random.Random(seed)
    cases = systematic(target, seed)
    rng.shuffle(cases)
    out = [case for case in cases if _answered(case.packet)][:count]
    while len(out) < count:
        parent = rng.choice(cases)
        packet = parent.packet
        for _ in range(rng.randint(1, 3)):
            packet = _mutate(rng, packet)
        if not _answered(packet):
            continue
        decoded = _decode(packet)
        # a mutant the codec rejects must fail; one it reads may be anything, even valid
        out.append(Hostile(packet, f"mutant of {parent.kind}", not isinstance(decoded, Request), _request_id(packet)))
    return out


# ---------------------------------------------------------------------------------------------- FIFOs for files


@dataclass(frozen=True)
class FifoImages:
    """Local images with a FIFO where a file is expected: a plain ``open()`` of one waits for a writer forever."""

    #: ``oci:`` reference of a layout whose layer ``blob_digest`` is a FIFO (index, manifest and config are fine)
    blob_layout: str
    blob_digest: str
    blob_path: Path
    #: ``oci:`` reference of a layout whose ``index.json`` is a FIFO
    index_layout: str
    index_path: Path
    #: ``dir:`` reference of an image whose ``manifest.json`` is a FIFO
    dir_image: str
    manifest_path: Path
    #: a bare FIFO, named as a layout, an archive, a dir: image
    fifo: Path

    @property
    def references(self) -> tuple[str, ...]:
        """Every reference whose OpenImage must fail at once naming a FIFO."""
        return (
            self.index_layout,
            self.dir_image,
            f"oci:{self.fifo}",
            f"dir:{self.fifo}",
            f"oci-archive:{self.fifo}",
            f"docker-archive:{self.fifo}",
        )


def fifo_images(root: Path, layout: Path, tag: str, layer_digest: str) -> FifoImages:
    """Copies of the OCI layout ``layout`` under ``root`` (made traversable by everyone), one with the layer
    ``layer_digest`` of image ``tag`` replaced by a FIFO, one with its index.json a FIFO; a ``dir:`` image whose
    manifest.json is a FIFO; and a bare FIFO. Everything readable by every user."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    blob_layout = root / "fifo-blob"
    shutil.copytree(layout, blob_layout)
    blob_path = blob_layout / "blobs" / "sha256" / layer_digest.split(":", 1)[1]
    blob_path.unlink()
    os.mkfifo(blob_path, 0o666)
    index_layout = root / "fifo-index"
    shutil.copytree(layout, index_layout)
    index_path = index_layout / "index.json"
    index_path.unlink()
    os.mkfifo(index_path, 0o666)
    dir_image = root / "fifo-dir"
    dir_image.mkdir()
    (dir_image / "version").write_text("Directory Transport Version: 1.1\n")
    manifest_path = dir_image / "manifest.json"
    os.mkfifo(manifest_path, 0o666)
    fifo = root / "fifo"
    os.mkfifo(fifo, 0o666)
    for path in (blob_layout, index_layout, dir_image):
        for directory, _subdirs, files in os.walk(path):
            os.chmod(directory, 0o755)
            for name in files:
                if not (Path(directory) / name).is_fifo():
                    os.chmod(Path(directory) / name, 0o644)
    return FifoImages(
        blob_layout=f"oci:{blob_layout}:{tag}",
        blob_digest=layer_digest,
        blob_path=blob_path,
        index_layout=f"oci:{index_layout}:{tag}",
        index_path=index_path,
        dir_image=f"dir:{dir_image}",
        manifest_path=manifest_path,
        fifo=fifo,
    )


# ---------------------------------------------------------------------------------------------- another user


#: how long the forked child of connect_as may take
CONNECT_AS_TIMEOUT = 10.0


def connect_as(path: str | os.PathLike[str], uid: int, gid: int, groups: Sequence[int] = ()) -> socket.socket:
    """A SOCK_SEQPACKET connection to ``path`` whose peer credentials are ``uid``/``gid``: a forked child takes that
    identity, connects, and passes the socket back over SCM_RIGHTS (the daemon reads SO_PEERCRED as of connect).
    Needs root. Raises OSError (e.g. EACCES) if that user cannot connect."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, then _exit
        status = 0
        try:
            ours.close()
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                conn.connect(os.fspath(path))
            except OSError as e:
                theirs.send(b"E%d" % e.errno)
            else:
                theirs.sendmsg([b"S"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))])
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    theirs.close()
    ours.settimeout(CONNECT_AS_TIMEOUT)
    try:
        data, ancdata, _, _ = ours.recvmsg(64, socket.CMSG_SPACE(array.array("i").itemsize))
    except TimeoutError:
        os.kill(pid, 9)
        raise OSError(f"the child connecting as uid {uid} did not answer within {CONNECT_AS_TIMEOUT} s") from None
    finally:
        ours.close()
        os.waitpid(pid, 0)
    fds = [fd for level, kind, payload in ancdata for fd in array.array("i", payload) if kind == socket.SCM_RIGHTS]
    if data.startswith(b"E"):
        err = int(data[1:])
        raise OSError(err, os.strerror(err), os.fspath(path))
    if data != b"S" or len(fds) != 1:
        raise OSError(f"the child connecting as uid {uid} failed ({data!r})")
    return socket.socket(fileno=fds[0])


# ---------------------------------------------------------------------------------------------- the hostile client


@dataclass
class Tally:
    """What one connection sent and got back."""

    sent: int = 0
    replies: int = 0
    successes: int = 0
    rate_limited: int = 0
    #: error replies saying "internal error" (a bug the daemon caught: its log has the traceback)
    internal_errors: int = 0
    fds: int = 0
    followups: int = 0
    #: the daemon closed the connection (EOF, or a send failed) before every reply came
    closed: str | None = None
    #: replies that decode_reply refused: (raw bytes, the error)
    malformed: list[tuple[bytes, str]] = field(default_factory=list)
    #: replies that succeeded where the request must fail: (request kind, request packet, reply)
    wrong_success: list[tuple[str, bytes, Reply]] = field(default_factory=list)
    #: replies with an id nobody sent, or more in-order replies than requests
    unexpected: list[Reply] = field(default_factory=list)
    #: requests never answered (left when the connection ended or the deadline passed)
    unanswered: list[Hostile] = field(default_factory=list)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    def problems(self) -> list[str]:
        out = [f"malformed reply {raw[:300]!r}: {error}" for raw, error in self.malformed[:10]]
        out += [f"{kind}: {packet[:200]!r} succeeded: {reply}" for kind, packet, reply in self.wrong_success[:10]]
        out += [f"unexpected reply {reply}" for reply in self.unexpected[:10]]
        out += [f"unanswered {case.kind}: {case.packet[:200]!r}" for case in self.unanswered[:10]]
        return out


def _fds_of(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


async def roundtrip(sock: trio.socket.SocketType, packet: bytes, timeout: float = 30.0) -> tuple[Reply, list[int]]:
    """Send one in-order request and read its reply (and fds, which the caller owns) on a raw connection."""
    with trio.fail_after(timeout):
        await sock.send(packet)
        data, ancdata, _, _ = await sock.recvmsg(
            MAX_MSG_SIZE + 1, socket.CMSG_SPACE(4 * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC
        )
    fds = _fds_of(ancdata)
    if not data:
        raise AssertionError(f"the daemon closed the connection instead of answering {packet[:200]!r}")
    return decode_reply(data), fds


async def drive(
    sock: trio.socket.SocketType,
    cases: Sequence[Hostile],
    *,
    window: int = 32,
    window_bytes: int = 1 << 20,
    rng: random.Random | None = None,
    hold_limit: int = 8,
    held: list[int] | None = None,
    deadline: float = 60.0,
) -> Tally:
    """Send ``cases`` over ``sock`` (at most ``window`` requests and ``window_bytes`` unanswered at a time), read
    every reply, and check it: decodable by ``protocol.codec.decode_reply``, one per request (in order without an
    id, by id with one), a failure where one is due. Pipes handed out are held unread (up to ``hold_limit``, their
    read ends appended to ``held``: the caller closes them), closed, or closed and finished with FinishPipe (a
    follow-up request, counted too), at random. Returns when everything is answered, the daemon closes the
    connection, or ``deadline`` seconds pass (what is left is ``unanswered``)."""
    rng = rng or random.Random(0)
    held = held if held is not None else []
    tally = Tally()
    in_order: collections.deque[Hostile] = collections.deque()
    by_id: dict[int, list[Hostile]] = collections.defaultdict(list)
    slots = trio.Semaphore(window)
    budget = {"bytes": 0}
    budget_changed = trio.Event()
    all_sent = trio.Event()
    outstanding = {"n": 0}
    done = trio.Event()
    followups: list[Hostile] = []
    followups_ready = trio.Event()

    def settle(case: Hostile) -> None:
        nonlocal budget_changed
        outstanding["n"] -= 1
        budget["bytes"] -= len(case.packet)
        budget_changed.set()
        budget_changed = trio.Event()
        slots.release()
        if all_sent.is_set() and outstanding["n"] == 0:
            done.set()

    async def send(case: Hostile) -> bool:
        await slots.acquire()
        while budget["bytes"] and budget["bytes"] + len(case.packet) > window_bytes:
            await budget_changed.wait()
        budget["bytes"] += len(case.packet)
        outstanding["n"] += 1
        if case.request_id is None:
            in_order.append(case)
        else:
            by_id[case.request_id].append(case)
        try:
            await sock.send(case.packet)
        except OSError as e:
            tally.closed = f"send: {e}"
            return False
        tally.sent += 1
        tally.kinds[case.kind.split(" ")[0]] += 1
        return True

    async def sender() -> None:
        try:
            for case in cases:
                if not await send(case):
                    return
                while followups:
                    if not await send(followups.pop(0)):
                        return
            while outstanding["n"] or followups:
                while followups:
                    if not await send(followups.pop(0)):
                        return
                if not outstanding["n"]:
                    break
                await followups_ready.wait()
        finally:
            all_sent.set()
            if outstanding["n"] == 0:
                done.set()

    def handle_fds(reply: Reply, fds: list[int]) -> None:
        nonlocal followups_ready
        tally.fds += len(fds)
        choice = rng.choice(("hold", "close", "finish")) if fds else "close"
        if choice == "hold" and len(held) < hold_limit:
            held.extend(fds)
            return
        for fd in fds:
            os.close(fd)
        if choice == "finish" and reply.pipeid:
            tally.followups += 1
            followups.append(Hostile(request("FinishPipe", [reply.pipeid]), "followup FinishPipe", False, None))
            followups_ready.set()
            followups_ready = trio.Event()

    async def receiver() -> None:
        nonlocal followups_ready
        space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, _flags, _ = await sock.recvmsg(MAX_MSG_SIZE + 1, space, socket.MSG_CMSG_CLOEXEC)
            except OSError as e:
                tally.closed = f"receive: {e}"
                break
            fds = _fds_of(ancdata)
            if not data:
                for fd in fds:
                    os.close(fd)
                tally.closed = tally.closed or "EOF"
                break
            tally.replies += 1
            try:
                reply = decode_reply(data)
            except ProtocolViolation as e:
                tally.malformed.append((data, str(e)))
                for fd in fds:
                    os.close(fd)
                continue
            if reply.id is None:
                case = in_order.popleft() if in_order else None
            else:
                pending = by_id.get(reply.id)
                case = pending.pop(0) if pending else None
            if case is None:
                tally.unexpected.append(reply)
                for fd in fds:
                    os.close(fd)
                continue
            if reply.success:
                tally.successes += 1
                if case.must_fail:
                    tally.wrong_success.append((case.kind, case.packet, reply))
            elif "request rate limit exceeded" in reply.error:
                tally.rate_limited += 1
            elif reply.error.startswith("internal error"):
                tally.internal_errors += 1
            handle_fds(reply, fds)
            settle(case)
            followups_ready.set()
            followups_ready = trio.Event()
        done.set()
        followups_ready.set()

    with trio.move_on_after(deadline):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
            await done.wait()
            nursery.cancel_scope.cancel()
    tally.unanswered = list(in_order) + [case for pending in by_id.values() for case in pending]
    return tally


__all__ = [
    "HOSTILE_DIGESTS",
    "SAFE_PIPE_IDS",
    "UNKNOWN_IMAGE_IDS",
    "WRONG_VALUES",
    "FifoImages",
    "Hostile",
    "Tally",
    "Target",
    "connect_as",
    "drive",
    "dumps",
    "fifo_images",
    "generate",
    "hostile_references",
    "request",
    "roundtrip",
    "systematic",
]
