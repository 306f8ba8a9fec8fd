"""Fuzz target: the whole server side of one session, in this process.

Each input is one session: a ``SOCK_SEQPACKET`` socketpair, ``proxy.server.session.serve_socket`` on one end, and on
the other a client that sends request packets made from the input with atheris' FuzzedDataProvider: methods
from the method table (or unknown ones), arguments of any type, references to the test images (an OCI layout
built once at start, with images broken in several ways, a ``dir:`` copy and archives), their digests and
sizes, image and pipe ids the session handed out, request ids (some reused), raw bytes, the occasional file
descriptor (which clients never send). Sent one at a time (each reply awaited) or as a batch (replies
collected as they come). Every pipe received is read once without blocking and closed.

An input that starts with a ``#lines`` line is a script instead: each further line one packet, sent as it is
(after ``@LAYOUT@``, ``@BROKEN@`` and ``@ROOT@`` are replaced by the test directory's paths, ``@PIPE@`` by the
last pipe id received): the seeds are real sessions written that way, and mutations of them stay close to real requests.

Invariants:

* every request gets exactly one reply (none for Shutdown), which ``decode_reply`` accepts, with the
  request's id, the method's number of file descriptors when it succeeds and none when it fails, an error text
  when it fails, and never an "internal error" (an exception the handler did not expect);
* the session ends cleanly on EOF (or after Shutdown): ``serve_socket`` returns, no exception escapes;
* every iteration ends within ``ITERATION_TIMEOUT`` seconds;
* no file descriptor is left open after an iteration (the count in /proc/self/fd, after a garbage collection).

The client never names a ``docker://`` image nor a local path outside the test directory: references that
would are replaced (the target fuzzes the session, not the network or the machine's files).

Run: ``python -m tests.fuzz.fuzz_session [libFuzzer flags] tests/fuzz/corpus/fuzz_session``.
"""

from __future__ import annotations

import array
import collections
import gc
import json
import logging
import os
import socket
import tarfile
import tempfile
import traceback
from pathlib import Path
from typing import Any

import atheris
import trio

from tests.fuzz import _common

with atheris.instrument_imports(include=["protocol", "proxy"]):
    from protocol.codec import MAX_MSG_SIZE, decode_reply, decode_request, encode_request
    from protocol.errors import ProtocolViolation
    from protocol.messages import Reply, Request
    from protocol.methods import METHODS, Param
    from protocol.session_settings import BOOLEAN_KEYS, STRING_KEYS
    from proxy.policy import ImagePolicy
    from proxy.server.limits import SessionLimits
    from proxy.server.options import ProxyOptions
    from proxy.server.session import serve_socket
    from proxy.sources.base import SourceOptions

from tests.support import images as test_images

#: seconds one session may take (a few packets on local files take milliseconds)
ITERATION_TIMEOUT = 10.0
MAX_PACKETS = 12
#: what the client reads of a pipe before closing it (without blocking: it may be finished only by FinishPipe)
PIPE_READ = 1 << 16
_ANCILLARY = socket.CMSG_SPACE(16 * array.array("i").itemsize)
_METHOD_NAMES = [*METHODS, "Bogus", "initialize", ""]
_LOCAL_TRANSPORTS = ("oci", "oci-archive", "docker-archive", "dir")


class World:
    """The test images and options, built once into a temporary directory."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz_session.")
        root = self.root = Path(self._tmp.name)
        specs = {
            "latest": test_images.SINGLE,
            "multi": test_images.MULTI,
            "v2s2": test_images.IndexSpec(instances=(test_images.V2S2,)),
            "v2list": test_images.V2LIST,
            "nolayers": test_images.NO_LAYERS,
        }
        layout = test_images.build_oci_layout(root / "layout", specs)
        single = layout.images["latest"]
        assert isinstance(single, test_images.BuiltImage)
        images: list[test_images.BuiltImage] = []
        for built in layout.images.values():
            if isinstance(built, test_images.BuiltIndex):
                images.extend(built.instances.values())
            else:
                images.append(built)
        self.digests = sorted(
            {d for i in images for d in (i.manifest_digest, i.config_digest, *(layer.digest for layer in i.layers))}
            | {b.digest for b in layout.images.values() if isinstance(b, test_images.BuiltIndex)}
        )
        self.sizes = sorted({s for i in images for s in (i.config_size, *(layer.size for layer in i.layers))})
        broken = self._broken_layout(root / "broken", single)
        self._dir_copy(root / "single.dir", single)
        with tarfile.open(root / "layout.tar", "w") as tar:
            tar.add(root / "layout", arcname=".")
        L = root / "layout"
        self.refs = [
            *(f"oci:{L}:{tag}" for tag in specs),
            f"oci:{L}:missing",
            f"oci:{L}",
            f"oci:{L}:@0",
            f"oci:{L}:@9",
            f"oci:{L}:@{single.manifest_digest}",
            *(f"oci:{broken}:{tag}" for tag in ("deep", "notjson", "badconfig", "nolayer", "artifact")),
            f"oci:{root}/nothing:x",
            f"dir:{root}/single.dir",
            f"oci-archive:{root}/layout.tar:latest",
            f"oci-archive:{root}/layout.tar:multi",
            f"docker-archive:{root}/layout.tar",
            "oci:",
            "docker-daemon:x",
            "nonsense",
        ]
        registries_d = root / "registries.d"
        registries_d.mkdir()
        common: dict[str, Any] = {
            "policy": ImagePolicy.from_flags(insecure=True, registries_d=str(registries_d)),
            "override_os": "linux",
            "override_arch": "amd64",
            "source_options": SourceOptions(tmpdir=str(root)),
        }
        tight = SessionLimits(open_images=2, open_pipes=2, concurrent_requests=2, max_request_size=200)
        self.options = [ProxyOptions(**common), ProxyOptions(limits=tight, **common)]

    @staticmethod
    def _broken_layout(path: Path, single: test_images.BuiltImage) -> Path:
        """Images whose manifest nests 600 deep, is not JSON, whose config is not JSON, whose layer is missing,
        and an artifact (a config of another type)."""
        blobs = path / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

        def blob(data: bytes) -> dict[str, Any]:
            d = test_images.sha256_digest(data)
            (blobs / d[7:]).write_bytes(data)
            return {"digest": d, "size": len(data)}

        def manifest(config: bytes, config_type: str, layers: list[dict[str, Any]], extra: bytes = b"") -> bytes:
            doc = {
                "schemaVersion": 2,
                "mediaType": test_images.OCI_MANIFEST,
                "config": {"mediaType": config_type, **blob(config)},
                "layers": layers,
            }
            raw = test_images.canonical_json(doc)
            return raw[:-1] + extra + b"}" if extra else raw

        layer = {"mediaType": test_images.OCI_LAYER_GZIP, **blob(single.blob(single.layers[0].digest))}
        missing = {"mediaType": test_images.OCI_LAYER_GZIP, "digest": "sha256:" + "0" * 64, "size": 10}
        manifests = {
            "deep": manifest(single.config, test_images.OCI_CONFIG, [layer], b',"x":' + b"[" * 600 + b"]" * 600),
            "notjson": b'{"schemaVersion":2,',
            "badconfig": manifest(b'{"architecture":', test_images.OCI_CONFIG, [layer]),
            "nolayer": manifest(single.config, test_images.OCI_CONFIG, [missing]),
            "artifact": manifest(b"{}", "application/vnd.example+json", [layer]),
        }
        index = {
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": test_images.OCI_MANIFEST, **blob(raw), "annotations": {test_images.REF_NAME: tag}}
                for tag, raw in manifests.items()
            ],
        }
        (path / "index.json").write_bytes(test_images.canonical_json(index))
        return path

    @staticmethod
    def _dir_copy(path: Path, image: test_images.BuiltImage) -> None:
        path.mkdir()
        (path / "version").write_text("Directory Transport Version: 1.1\n")
        (path / "manifest.json").write_bytes(image.manifest)
        for d in (image.config_digest, *(layer.digest for layer in image.layers)):
            (path / d[7:]).write_bytes(image.blob(d))

    def safe_reference(self, ref: str) -> str:
        """``ref``, unless it would reach the network or a path outside the test directory."""
        transport, _, within = ref.partition(":")
        if transport not in _LOCAL_TRANSPORTS:
            return ref if transport != "docker" else f"oci:{self.root}/nothing:x"
        if ".." in within or "\x00" in within or (within.startswith("/") and not within.startswith(str(self.root))):
            return f"oci:{self.root}/nothing:x"
        if within and not within.startswith("/"):
            return f"oci:{self.root}/nothing:x"  # relative to the fuzzer's working directory: not ours
        return ref


WORLD: World | None = None


class State:
    """What the client knows: the image and pipe ids it was given."""

    def __init__(self) -> None:
        self.image_ids: list[int] = [1]
        self.pipe_ids: list[int] = [1]


def argument(fdp: atheris.FuzzedDataProvider, param: Param, state: State, world: World) -> Any:
    if fdp.ConsumeIntInRange(0, 9) == 0:
        return _common.json_value(fdp)
    if param is Param.IMAGE_REF:
        if fdp.ConsumeIntInRange(0, 5) == 0:
            return fdp.PickValueInList(world.refs) + _common.json_string(fdp, 8)
        return fdp.PickValueInList(world.refs)
    if param is Param.IMAGE_ID:
        return fdp.PickValueInList([*state.image_ids[-4:], 0, 1, 2, 300])
    if param is Param.PIPE_ID:
        return fdp.PickValueInList([*state.pipe_ids[-4:], 0, 1, 12345])
    if param is Param.DIGEST:
        if fdp.ConsumeIntInRange(0, 7) == 0:
            return fdp.PickValueInList(["sha256:" + "0" * 64, "sha256:abc", "sha512:" + "1" * 128, "SHA256:x"])
        return fdp.PickValueInList(world.digests)
    if param is Param.SIZE:
        return fdp.PickValueInList([*world.sizes, 0, 1, -1, 2**53 - 1])
    if param is Param.RANGES:
        ranges = []
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            ranges.append([fdp.ConsumeIntInRange(0, 80_000), fdp.ConsumeIntInRange(0, 70_000)])
        return ranges
    if param is Param.SETTINGS:
        settings: dict[str, Any] = {}
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            key = fdp.PickValueInList([*STRING_KEYS, *BOOLEAN_KEYS, "tls_verify", ""])
            if key == "auth_file" and fdp.ConsumeBool():
                settings[key] = '{"auths":{"h":{"auth":"' + _common.json_string(fdp, 12) + '"}}}'
            elif key in BOOLEAN_KEYS:
                settings[key] = fdp.ConsumeBool()
            else:
                settings[key] = _common.json_string(fdp, 24)
        return settings
    raise AssertionError(param)


def make_packet(fdp: atheris.FuzzedDataProvider, state: State, world: World, allow_shutdown: bool) -> bytes:
    mode = fdp.ConsumeIntInRange(0, 15)
    if mode == 0:
        # never empty: a zero-length packet reads as EOF, and ends the session without a reply
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)) or b" "
    if mode == 1:
        return dumps(fdp, _common.json_value(fdp))
    method = fdp.PickValueInList(_METHOD_NAMES)
    if method == "Shutdown" and not allow_shutdown:
        method = "GetCapabilities"
    spec = METHODS.get(method)
    params = list(spec.params) if spec is not None else []
    if fdp.ConsumeIntInRange(0, 9) == 0:
        params = [fdp.PickValueInList(list(Param)) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    doc: dict[str, Any] = {"method": method, "args": [argument(fdp, p, state, world) for p in params]}
    if fdp.ConsumeIntInRange(0, 19) == 0:
        doc["args"] = _common.json_value(fdp)
    if fdp.ConsumeIntInRange(0, 2) == 0:
        doc["id"] = fdp.PickValueInList([0, 1, 2, 3, 7, 7.0, -1, 1.5, 2**53, "1", None])
    return dumps(fdp, doc)


def dumps(fdp: atheris.FuzzedDataProvider, value: Any) -> bytes:
    """JSON with lone surrogates as ``\\udcff`` escapes, or raw in the bytes (then not UTF-8)."""
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode("ascii")


def is_shutdown(packet: bytes, options: ProxyOptions) -> bool:
    """Whether the session reads ``packet`` as Shutdown (not when it is over the request size limit)."""
    if len(packet) > options.limits.max_request_size:
        return False
    decoded = decode_request(packet)
    return isinstance(decoded, Request) and decoded.method == "Shutdown"


def sanitized(packet: bytes, world: World) -> bytes:
    """``packet``, or the same request naming a safe image if it would open one elsewhere."""
    decoded = decode_request(packet)
    if not isinstance(decoded, Request) or decoded.method not in ("OpenImage", "OpenImageOptional"):
        return packet
    args = list(decoded.args)
    if args and isinstance(args[0], str) and world.safe_reference(args[0]) != args[0]:
        args[0] = world.safe_reference(args[0])
        return encode_request(Request(decoded.method, args, decoded.id))
    return packet


def expectation(packet: bytes) -> tuple[int | None, str | None]:
    """The id the reply must carry, and the method when the packet is a request of a known one."""
    decoded = decode_request(packet)
    if isinstance(decoded, ProtocolViolation):
        return decoded.request_id, None
    return decoded.id, decoded.method if decoded.method in METHODS else None


def drain_and_close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.set_blocking(fd, False)
            os.read(fd, PIPE_READ)
        except OSError:
            pass  # nothing written yet (BlockingIOError), or not a pipe
        finally:
            os.close(fd)


async def receive(sock: trio.socket.SocketType) -> tuple[Reply, list[int]] | None:
    """One reply and its descriptors (already drained and closed); None at EOF."""
    data, ancdata, flags, _ = await sock.recvmsg(MAX_MSG_SIZE + 1, _ANCILLARY)
    fds: list[int] = []
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", raw[: len(raw) - len(raw) % array.array("i").itemsize]))
    drain_and_close(fds)
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), f"reply truncated (flags {flags:#x})"
    if not data:
        assert not fds, "descriptors with EOF"
        return None
    reply = decode_reply(data)  # raises ProtocolViolation for a malformed reply
    if reply.success:
        assert reply.error == "", reply
    else:
        assert reply.error, f"a failure without an error text: {data!r}"
        assert "internal error" not in reply.error, reply.error
        assert not fds, f"{len(fds)} descriptors with an error reply: {reply.error}"
    return reply, fds


def check_reply(reply: Reply, fds: list[int], method: str | None, state: State) -> None:
    if not reply.success or method is None:
        return
    spec = METHODS[method]
    assert len(fds) == spec.fd_count, f"{method}: {len(fds)} descriptors, expected {spec.fd_count}"
    if spec.fd_count and method != "GetRawBlob":
        assert reply.pipeid > 0, reply
        state.pipe_ids.append(reply.pipeid)
    if method in ("OpenImage", "OpenImageOptional") and isinstance(reply.value, int) and reply.value:
        state.image_ids.append(reply.value)


async def send(sock: trio.socket.SocketType, packet: bytes, with_fd: bool) -> None:
    if with_fd:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)
    else:
        await sock.send(packet)


async def one_at_a_time(
    sock: trio.socket.SocketType, fdp: atheris.FuzzedDataProvider, world: World, options: ProxyOptions
) -> None:
    state = State()
    for _ in range(fdp.ConsumeIntInRange(1, MAX_PACKETS)):
        packet = sanitized(make_packet(fdp, state, world, allow_shutdown=True), world)
        if not await exchange(sock, packet, fdp.ConsumeIntInRange(0, 15) == 0, options, state):
            return
    if fdp.ConsumeBool():
        await exchange(sock, encode_request(Request("Shutdown", [])), False, options, state)


async def exchange(
    sock: trio.socket.SocketType, packet: bytes, with_fd: bool, options: ProxyOptions, state: State
) -> bool:
    """Send one packet and check its reply; False after Shutdown (which has none: the session ends)."""
    await send(sock, packet, with_fd)
    if is_shutdown(packet, options):
        assert await receive(sock) is None, "Shutdown was answered"
        return False
    request_id, method = expectation(packet)
    got = await receive(sock)
    assert got is not None, f"EOF instead of the reply to {packet[:200]!r}"
    reply, fds = got
    assert reply.id == request_id, f"reply id {reply.id}, request id {request_id}: {packet[:200]!r}"
    check_reply(reply, fds, method, state)
    return True


async def scripted(sock: trio.socket.SocketType, data: bytes, world: World, options: ProxyOptions) -> None:
    """A ``#lines`` input: each further line is one packet, sent as it is once ``@LAYOUT@``, ``@BROKEN@`` and
    ``@ROOT@`` are replaced by the test directory's paths and ``@PIPE@`` by the last pipe id received (so that
    seeds can be real sessions)."""
    state = State()
    lines = [line for line in data.split(b"\n")[1:] if line][:MAX_PACKETS]
    for line in lines:
        for name, path in (("LAYOUT", world.root / "layout"), ("BROKEN", world.root / "broken"), ("ROOT", world.root)):
            line = line.replace(f"@{name}@".encode(), str(path).encode())
        line = line.replace(b"@PIPE@", str(state.pipe_ids[-1]).encode())
        if not await exchange(sock, sanitized(line, world), False, options, state):
            return


async def as_a_batch(
    sock: trio.socket.SocketType, fdp: atheris.FuzzedDataProvider, world: World, options: ProxyOptions
) -> None:
    """Send every packet at once; replies (with ids in any order) are collected as they come."""
    state = State()
    packets = [
        sanitized(make_packet(fdp, state, world, allow_shutdown=False), world)
        for _ in range(fdp.ConsumeIntInRange(1, MAX_PACKETS))
    ]
    # Shutdown gives pending requests only 0.5 s: a batch has none, so that every request must be answered
    packets = [p for p in packets if not is_shutdown(p, options)]
    expected = collections.Counter(expectation(p)[0] for p in packets)
    received: collections.Counter[int | None] = collections.Counter()

    async def sender() -> None:
        for packet in packets:
            await send(sock, packet, False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        for _ in packets:
            got = await receive(sock)
            assert got is not None, f"EOF after {sum(received.values())} of {len(packets)} replies"
            received[got[0].id] += 1
    assert received == expected, f"replies by id {dict(received)}, requests by id {dict(expected)}"


async def session(data: bytes, world: World) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    lines = data.startswith(b"#lines\n")
    options = world.options[0 if lines else fdp.ConsumeIntInRange(0, 7) == 0]
    batch = not lines and fdp.ConsumeIntInRange(0, 3) == 0
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with trio.fail_after(ITERATION_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_socket, theirs, options)  # closes ``theirs`` when done
            with trio.socket.from_stdlib_socket(ours) as sock:
                if lines:
                    await scripted(sock, data, world, options)
                elif batch:
                    await as_a_batch(sock, fdp, world, options)
                else:
                    await one_at_a_time(sock, fdp, world, options)
            # our end closed: EOF, and serve_socket must return


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def test_one_input(data: bytes) -> None:
    global WORLD
    if WORLD is None:
        WORLD = World()
    before = open_fds()
    try:
        trio.run(session, data, WORLD)
    except BaseExceptionGroup as group:
        # atheris prints the group's own traceback only: show what is inside it
        raise AssertionError("".join(traceback.format_exception(group))) from None
    after = open_fds()
    if len(after) > len(before):
        gc.collect()  # descriptors of objects in reference cycles are closed when they are collected
        after = open_fds()
    if len(after) > len(before):
        leaked = []
        for fd in sorted(set(after) - set(before)):
            try:
                leaked.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                leaked.append(fd)
        raise AssertionError(f"{len(after) - len(before)} file descriptors leaked: {', '.join(leaked)}")


def main() -> None:
    logging.disable(logging.CRITICAL)  # replies tell what went wrong; the logs would only slow the fuzzer
    global WORLD
    WORLD = World()
    _common.run("fuzz_session", test_one_input)


if __name__ == "__main__":
    main()
