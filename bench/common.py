"""Shared parts of the benchmarks: a docker-registry on loopback (plain HTTP or TLS with a self-signed certificate),
the one-layer image pushed into it, a small synchronous client of the proxy protocol over a ``SOCK_SEQPACKET``
socketpair, a pipe drain, /proc readers, one measured GetBlob, the reference programs (a hashlib loop over a file, a
blocking HTTP(S) read loop), the start of every bench's ``main()`` and the report helpers. Standard library only.

The reference programs also run on their own: ``python bench/common.py ref-hashlib FILE [DIGEST]`` and
``python bench/common.py ref-http-read URL [--hash]`` (see ``reference_argv``).
"""

from __future__ import annotations

import array
import contextlib
import datetime
import hashlib
import http.client
import inspect
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
MB = 1e6  # throughput is in MB/s (10^6 bytes per second)
GB = 1e9  # CPU is in seconds per GB (10^9 bytes)
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: the protocol's maximum packet size
MAX_MSG_SIZE = 32 * 1024
#: room for two SCM_RIGHTS fds (only GetRawBlob sends two; we never call it)
FD_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REPOSITORY = "bench/big"
TAG = "latest"

#: bytes per relay read
RELAY_READ_SIZE = 1 << 20
#: the most connections the relay holds open at once, by default (one server opens one or two)
RELAY_MAX_CONNECTIONS = 16


# ------------------------------------------------------------------------------------------- /proc readers


def proc_cpu(pid: int) -> float:
    """utime + stime (+ waited-for children's) of a live process, in seconds, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def proc_hwm_bytes(pid: int) -> int:
    """VmHWM (peak resident set size) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def reset_hwm(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS (``5`` into /proc/<pid>/clear_refs, Linux 4.0+; needs the
    process to be ours), so a later VmHWM is the peak since now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------- registry


@dataclass
class RunningRegistry:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    tls: bool = False  # HTTPS with a self-signed certificate (clients must not verify it)

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def blob_url(self, digest: str) -> str:
        return f"{self.scheme}://{self.authority}/v2/{REPOSITORY}/blobs/{digest}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unverified_tls_context() -> ssl.SSLContext:
    """A client context that checks neither the certificate nor the host name (the registry's is self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _answers(port: int, tls: bool) -> bool:
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=unverified_tls_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def tls_parameters(registry: RunningRegistry) -> str:
    """The TLS version and cipher suite a Python client with the default context (as our server and the Python
    references use) negotiates with ``registry``, e.g. ``TLSv1.3, TLS_AES_256_GCM_SHA384``."""
    with (
        socket.create_connection(("127.0.0.1", registry.port), timeout=10) as raw,
        unverified_tls_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        cipher = sock.cipher()
        return f"{sock.version()}, {cipher[0] if cipher else 'unknown'}"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for IP 127.0.0.1, valid 2 days, made with the ``openssl`` CLI in
    ``directory``. Returns (certificate, key), both PEM."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [
        shutil.which("openssl") or "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return cert, key


@contextlib.contextmanager
def docker_registry(workdir: Path, tls: bool = False) -> Iterator[RunningRegistry]:
    """A no-auth docker-registry on 127.0.0.1 storing under ``workdir`` until the block ends: plain HTTP, or with
    ``tls`` HTTPS only, with a self-signed certificate made in ``workdir`` (see ``self_signed_certificate``)."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    port = free_port()
    http_config: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": "bench-secret-not-for-production"}
    if tls:
        cert, key = self_signed_certificate(workdir)
        http_config["tls"] = {"certificate": str(cert), "key": str(key)}
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": http_config,
    }
    config_path = workdir / "config.yml"  # YAML is a superset of JSON
    config_path.write_text(json.dumps(config))
    log = workdir / "registry.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "serve", str(config_path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not _answers(port, tls):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield RunningRegistry(process, port, log, tls)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 5 s; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------------------- image


@dataclass(frozen=True)
class Layer:
    path: Path  # the blob file in the OCI layout
    digest: str
    size: int


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    hexdigest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / hexdigest).write_bytes(data)
    return f"sha256:{hexdigest}", len(data)


def _write_layer(blobs: Path, name: str, content_size: int) -> tuple[Layer, str]:
    """A layer blob in ``blobs``: a gzip-level-0 tar of one file ``name`` of ``content_size`` random bytes,
    written in 1 MiB steps, never held in memory. Returns (layer, diff_id)."""
    diff_hash = hashlib.sha256()  # of the uncompressed tar
    blob_hash = hashlib.sha256()  # of the gzip stream
    compressor = zlib.compressobj(0, zlib.DEFLATED, 31)  # level 0, gzip wrapper (mtime 0)
    partial = blobs / "layer.partial"
    with partial.open("wb") as out:

        def emit(tar_bytes: bytes) -> None:
            diff_hash.update(tar_bytes)
            compressed = compressor.compress(tar_bytes)
            if compressed:
                blob_hash.update(compressed)
                out.write(compressed)

        info = tarfile.TarInfo(name)
        info.size = content_size
        info.mode = 0o644
        info.mtime = 1_704_164_645
        info.uname = info.gname = "root"
        emit(info.tobuf(format=tarfile.USTAR_FORMAT))
        remaining = content_size
        while remaining:
            chunk = os.urandom(min(remaining, MIB))
            remaining -= len(chunk)
            emit(chunk)
        emit(b"\0" * (-content_size % tarfile.BLOCKSIZE) + b"\0" * (2 * tarfile.BLOCKSIZE))
        tail = compressor.flush()
        blob_hash.update(tail)
        out.write(tail)
        size = out.tell()
    path = blobs / blob_hash.hexdigest()
    partial.rename(path)
    return Layer(path, f"sha256:{blob_hash.hexdigest()}", size), f"sha256:{diff_hash.hexdigest()}"


def _write_image(layout: Path, layers: Sequence[Layer], diff_ids: Sequence[str], created_by: str) -> None:
    """The config, the manifest and index.json (tag ``latest``) of an image made of ``layers``."""
    config = _canonical(
        {
            "created": "2024-01-02T03:04:05Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created": "2024-01-02T03:04:05Z", "created_by": created_by}],
        }
    )
    config_digest, config_size = _write_blob(layout, config)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers],
        }
    )
    manifest_digest, manifest_size = _write_blob(layout, manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))


def _new_layout(layout: Path) -> Path:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    return blobs


def build_layout(layout: Path, content_size: int) -> tuple[Layer, str]:
    """An OCI layout with one image (tag ``latest``) whose one layer is a gzip-level-0 tar of one file of
    ``content_size`` random bytes; written in 1 MiB steps, never held in memory. Returns (layer, diff_id)."""
    blobs = _new_layout(layout)
    layer, diff_id = _write_layer(blobs, "random.bin", content_size)
    _write_image(layout, [layer], [diff_id], "bench/blob_throughput.py")
    return layer, diff_id


def build_layers_layout(layout: Path, content_sizes: Sequence[int], created_by: str) -> list[Layer]:
    """An OCI layout with one image (tag ``latest``) of one layer per entry of ``content_sizes``, each a
    gzip-level-0 tar of one file (``layer<n>.bin``) of that many random bytes. Returns the layers in order."""
    blobs = _new_layout(layout)
    written = [_write_layer(blobs, f"layer{n}.bin", size) for n, size in enumerate(content_sizes)]
    _write_image(layout, [layer for layer, _ in written], [diff_id for _, diff_id in written], created_by)
    return [layer for layer, _ in written]


def push(layout: Path, registry: RunningRegistry, timeout: float, repository: str = REPOSITORY) -> None:
    argv = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"oci:{layout}:{TAG}",
        f"docker://{registry.authority}/{repository}:{TAG}",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


# ------------------------------------------------------------------------------------------- the daemon


def daemon_argv(listen: Path, cache: Path | None, config: Path, extra: Sequence[str] = ()) -> list[str]:
    """``image-proxy daemon`` listening on ``listen``, its blob cache in ``cache`` (None: ``--no-blob-cache``)."""
    cache_flags = ["--blob-cache", str(cache)] if cache is not None else ["--no-blob-cache"]
    return [
        sys.executable,
        "-m",
        "proxy",
        "daemon",
        "--listen",
        str(listen),
        *cache_flags,
        "--config",
        str(config),
        "--tls-verify=false",
        *extra,
    ]


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    listen: Path
    log: Path

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def relay_argv(self, config: Path) -> list[str]:
        """``image-proxy experimental-image-proxy`` spawned as a relay to this daemon: writes ``config`` saying
        ``[spawned] daemon = LISTEN`` (proxy/server/relay.py). No other flag: one the daemon would not apply, such as
        ``--tls-verify``, makes the process serve its client itself."""
        config.write_text(f'[spawned]\ndaemon = "{self.listen}"\n')
        return [sys.executable, "-m", "proxy", "experimental-image-proxy", "--config", str(config)]


@contextlib.contextmanager
def image_proxy_daemon(
    workdir: Path, timeout: float, extra: Sequence[str] = (), config_text: str = "", blob_cache: bool = True
) -> Iterator[RunningDaemon]:
    """``image-proxy daemon`` with a fresh empty blob cache under ``workdir`` (none without ``blob_cache``), yielded
    once it has sent READY=1 on the notify socket; stopped with SIGTERM at the end of the block, which must make it
    exit 0."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    listen, notify_path, config, log = (workdir / name for name in ("proxy.sock", "notify.sock", "config.toml", "log"))
    config.write_text(config_text)  # (empty by default) no /etc/image-proxy/config.toml of this machine applies
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    env["NOTIFY_SOCKET"] = str(notify_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        with log.open("wb") as out:
            process = subprocess.Popen(
                daemon_argv(listen, workdir / "cache" if blob_cache else None, config, extra),
                stdout=out,
                stderr=out,
                cwd=REPO_ROOT,
                env=env,
            )
        daemon = RunningDaemon(process, listen, log)
        try:
            _wait_ready(notify, daemon, timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
    try:
        yield daemon
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"the daemon did not exit within {timeout} s of SIGTERM\n{daemon.log_tail()}") from None
    if status != 0:
        raise RuntimeError(f"the daemon exited {status} after SIGTERM\n{daemon.log_tail()}")


def _wait_ready(notify: socket.socket, daemon: RunningDaemon, timeout: float) -> None:
    """Read notify datagrams until one says READY=1; fail if the daemon exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    notify.settimeout(0.5)  # only to look at the process between datagrams; READY=1 ends the wait when it comes
    while True:
        try:
            message = notify.recv(4096).decode(errors="replace")
        except TimeoutError:
            message = ""
        if "READY=1" in message.splitlines():
            return
        if daemon.process.poll() is not None:
            raise RuntimeError(f"the daemon exited {daemon.process.returncode} before READY=1\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no READY=1 from the daemon within {timeout} s\n{daemon.log_tail()}")


# ------------------------------------------------------------------------------------------- client


class ProtocolError(RuntimeError):
    pass


@dataclass
class Reply:
    value: Any
    pipeid: int
    fds: list[int]


class SocketClient:
    """The client side of one protocol connection: a connected ``SOCK_SEQPACKET`` socket."""

    def __init__(self, sock: socket.socket, timeout: float, log: Path | None = None) -> None:
        self.sock = sock
        self.log = log
        self.sock.settimeout(timeout)
        #: the id the next request carries (extension request-ids, docs/PROTOCOL.md); None: requests carry none
        self.next_id: int | None = None

    @classmethod
    def connect(cls, path: str | Path, timeout: float, log: Path | None = None) -> SocketClient:
        """A connection to a listening server (``image-proxy daemon --listen PATH``); ``log`` is its log file."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout, log)

    def call(self, method: str, *args: Any) -> Reply:
        request: dict[str, Any] = {"method": method, "args": list(args)}
        if self.next_id is not None:
            request["id"] = self.next_id
            self.next_id += 1
        self.sock.send(json.dumps(request).encode())
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(MAX_MSG_SIZE, FD_SPACE)
        except TimeoutError:
            raise ProtocolError(f"{method}: no reply within {self.sock.gettimeout()} s") from None
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            raise ProtocolError(f"{method}: the server closed the socket\n{self.log_tail()}")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(f"{method}: truncated reply (flags {flags:#x})")
        reply = json.loads(data)
        if "id" in request and reply.get("id") != request["id"]:
            raise ProtocolError(f"{method}: the reply carries id {reply.get('id')!r}, the request {request['id']}")
        if not reply.get("success"):
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{method} failed: {reply.get('error')!r}")
        return Reply(reply.get("value"), int(reply.get("pipeid") or 0), list(fds))

    def log_tail(self) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.sock.close()


class ProxyClient(SocketClient):
    """One server process on the far end of a SOCK_SEQPACKET socketpair (its stdin)."""

    def __init__(self, argv: Sequence[str], log: Path, timeout: float) -> None:
        sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with log.open("wb") as out:
                self.process: subprocess.Popen[bytes] = subprocess.Popen(
                    list(argv), stdin=child.fileno(), stdout=out, stderr=out, cwd=REPO_ROOT
                )
        except BaseException:
            sock.close()
            raise
        finally:
            child.close()
        super().__init__(sock, timeout, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        """Shutdown (best effort), then make sure the process is gone and reaped."""
        with contextlib.suppress(OSError, ProtocolError, json.JSONDecodeError):
            if self.process.poll() is None:
                self.sock.settimeout(10)
                self.call("Shutdown")
        self.sock.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Drain:
    """Reads a pipe fd to EOF in a thread, hashing every byte (and keeping them in ``data`` with ``keep``)."""

    fd: int
    read_size: int
    hash_data: bool
    keep: bool = False
    size: int = 0
    sha256: str = ""
    data: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="drain", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        digest = hashlib.sha256()
        buffer = bytearray(self.read_size)
        view = memoryview(buffer)
        try:
            with open(self.fd, "rb", buffering=0, closefd=True) as pipe:
                while n := pipe.readinto(view):
                    if self.hash_data:
                        digest.update(view[:n])
                    if self.keep:
                        self.data += view[:n]
                    self.size += n
            self.sha256 = f"sha256:{digest.hexdigest()}" if self.hash_data else ""
        except BaseException as e:
            self.error = e

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise ProtocolError(f"the pipe did not reach EOF within {timeout} s")
        if self.error is not None:
            raise ProtocolError(f"reading the pipe failed: {self.error!r}")


# ------------------------------------------------------------------------------------------- counting relay


class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of the registry that counts the bytes read from the registry, and can
    SIGKILL a process once that count reaches a mark (so the kill lands at a byte position, not a time).
    Connections beyond ``max_connections`` at once are closed at accept and counted in ``refused``."""

    def __init__(
        self, upstream_port: int, max_connections: int = RELAY_MAX_CONNECTIONS, read_size: int = RELAY_READ_SIZE
    ) -> None:
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self.read_size = read_size
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self._upstream_bytes = 0
        self._delivered_bytes = 0
        self._open: set[socket.socket] = set()
        self._connections = 0
        self._kill_pid: int | None = None
        self._kill_at = 0
        self.killed_at: int | None = None  # the count when the kill was sent
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._acceptor.start()

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def upstream_bytes(self) -> int:
        with self._cond:
            return self._upstream_bytes

    @property
    def delivered_bytes(self) -> int:
        """Of those, the bytes handed to the client's socket (the rest was in the relay's buffer)."""
        with self._cond:
            return self._delivered_bytes

    def arm_kill(self, pid: int, at: int) -> None:
        """SIGKILL ``pid`` as soon as the count of bytes read from the registry reaches ``at``."""
        with self._cond:
            self._kill_pid, self._kill_at, self.killed_at = pid, at, None

    def disarm(self) -> None:
        with self._cond:
            self._kill_pid = None

    def wait_idle(self, timeout: float) -> None:
        """Wait until every relayed connection has ended (after a kill: nothing more is read for it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._connections == 0, timeout):
                raise RuntimeError(f"relay: {self._connections} connections still open after {timeout} s")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sockets = list(self._open)
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)

    def _count(self, n: int) -> None:
        with self._cond:
            self._upstream_bytes += n
            if self._kill_pid is not None and self._upstream_bytes >= self._kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._kill_pid, signal.SIGKILL)
                self.killed_at = self._upstream_bytes
                self._kill_pid = None

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._cond:
                refuse = self._closed or self._connections >= self.max_connections
                if not refuse:
                    self._connections += 1
                elif not self._closed:
                    self.refused += 1
            if refuse:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), name="relay-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            upstream.settimeout(None)
            with self._cond:
                self._open.update((client, upstream))
            back = threading.Thread(target=self._pump, args=(upstream, client, True), name="relay-down", daemon=True)
            back.start()
            self._pump(client, upstream, False)
            back.join()
        except OSError:
            pass
        finally:
            with self._cond:
                self._open.discard(client)
                if upstream is not None:
                    self._open.discard(upstream)
            client.close()
            if upstream is not None:
                upstream.close()
            with self._cond:
                self._connections -= 1
                self._cond.notify_all()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        buffer = bytearray(self.read_size)
        view = memoryview(buffer)
        try:
            while n := src.recv_into(view):
                if counted:
                    self._count(n)
                dst.sendall(view[:n])
                if counted:
                    with self._cond:
                        self._delivered_bytes += n
        except OSError:
            pass
        finally:  # one direction ended: end the other too (HTTP/1.1 clients do not half-close)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def counting_relay(
    upstream_port: int, max_connections: int = RELAY_MAX_CONNECTIONS, read_size: int = RELAY_READ_SIZE
) -> Iterator[CountingRelay]:
    relay = CountingRelay(upstream_port, max_connections, read_size)
    try:
        yield relay
    finally:
        relay.close()


# ------------------------------------------------------------------------------------------- one measured GetBlob


@dataclass(frozen=True)
class ProcessUse:
    """What one of the processes serving a measured GetBlob used."""

    cpu: float  # CPU during the transfer
    cpu_total: float  # CPU from exec (a process already running, a daemon: from the session's start) to the end
    hwm: int  # VmHWM at the end (a process already running: the peak since the transfer started)


@dataclass
class BlobTransfer:
    """One server process's GetBlob of the layer, drained to EOF and measured."""

    case: str  # what ran (which server, with what options)
    round: int
    protocol: str  # the version Initialize returned
    bytes: int
    wall: float  # GetBlob sent -> FinishPipe reply received and pipe at EOF
    server_cpu: float  # server CPU during the transfer
    server_cpu_total: float  # server CPU from exec to just before Shutdown
    server_hwm: int  # VmHWM just before Shutdown
    client_cpu: float  # this process's CPU during the transfer
    registry_cpu: float  # docker-registry's CPU during the transfer
    relayed_setup: int | None  # bytes read from the registry by the relay before GetBlob (None: not relayed)
    relayed_transfer: int | None  # ... between GetBlob and the end of the transfer
    #: each server process, in the order measured (the sums are above)
    parts: tuple[ProcessUse, ...] = ()

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.wall

    def per_gb(self, seconds: float) -> float:
        return seconds / (self.bytes / GB)


#: the rows of a table of transfers: label, number format, value
TRANSFER_METRICS: list[tuple[str, str, Callable[[BlobTransfer], float]]] = [
    ("throughput, MB/s (higher is better)", ".0f", lambda r: r.mb_s),
    ("transfer wall time, s", ".2f", lambda r: r.wall),
    ("server CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.server_cpu)),
    ("server CPU, whole process, s", ".2f", lambda r: r.server_cpu_total),
    ("server peak RSS (VmHWM), MiB", ".1f", lambda r: r.server_hwm / MIB),
    ("client CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.client_cpu)),
    ("registry CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.registry_cpu)),
]


@dataclass(frozen=True)
class ServerProcess:
    """A process whose CPU and peak RSS a measured GetBlob counts as the server's."""

    pid: int
    #: its CPU when the session began: 0 for a process spawned for the session (counted from exec); for one that
    #: was already running (a daemon), read just before the session, which also resets its VmHWM when the transfer
    #: starts, so its peak RSS is the transfer's
    cpu0: float = 0.0
    running: bool = False

    @classmethod
    def already_running(cls, pid: int) -> ServerProcess:
        """A process running before the session (a daemon): its CPU counts from now."""
        return cls(pid, proc_cpu(pid), running=True)


def transfer_log(workdir: Path, case: str, round_no: int) -> Path:
    """The log file of the server spawned for ``case`` in round ``round_no``."""
    return workdir / f"{case.replace(', ', '-').replace(' ', '-')}-{round_no}.log"


def measure_get_blob(
    case: str,
    round_no: int,
    argv: Sequence[str],
    authority: str,
    registry: RunningRegistry,
    layer: Layer,
    workdir: Path,
    read_size: int,
    hash_data: bool,
    timeout: float,
    relay: CountingRelay | None = None,
) -> BlobTransfer:
    """One server process (``argv``, on a socketpair, its log in ``workdir``), measured by ``measure_session``."""
    client = ProxyClient(argv, transfer_log(workdir, case, round_no), timeout)
    servers = [ServerProcess(client.pid)]
    return measure_session(
        case, round_no, client, servers, authority, registry, layer, read_size, hash_data, timeout, relay
    )


def measure_session(
    case: str,
    round_no: int,
    client: SocketClient,
    servers: Sequence[ServerProcess],
    authority: str,
    registry: RunningRegistry,
    layer: Layer,
    read_size: int,
    hash_data: bool,
    timeout: float,
    relay: CountingRelay | None = None,
) -> BlobTransfer:
    """One session on ``client`` (closed at the end): Initialize, OpenImage of the image at ``authority``, then
    GetBlob of ``layer`` drained to EOF (size and, with ``hash_data``, digest checked) while FinishPipe is sent. The
    server's CPU and peak RSS are the sums over ``servers`` (a spawned proxy; a daemon; a relay and its daemon).
    With ``relay`` (the server reaches the registry through it), the bytes it read from the registry before and
    during the transfer are counted too."""
    try:
        version = client.call("Initialize").value
        image = client.call("OpenImage", f"docker://{authority}/{REPOSITORY}:{TAG}").value
        relayed0 = relay.upstream_bytes if relay is not None else 0
        registry_cpu0 = proc_cpu(registry.process.pid)
        for server in servers:
            if server.running:
                reset_hwm(server.pid)
        server_cpu0 = [proc_cpu(server.pid) for server in servers]
        client_cpu0 = self_cpu()
        start = time.perf_counter()
        got = client.call("GetBlob", image, layer.digest, layer.size)
        if len(got.fds) != 1:
            raise ProtocolError(f"GetBlob sent {len(got.fds)} fds")
        drain = Drain(got.fds[0], read_size, hash_data)
        try:
            client.call("FinishPipe", got.pipeid)
        finally:
            drain.join(timeout)
        wall = time.perf_counter() - start
        client_cpu = self_cpu() - client_cpu0
        server_cpu_end = [proc_cpu(server.pid) for server in servers]
        registry_cpu = proc_cpu(registry.process.pid) - registry_cpu0
        relayed1 = relay.upstream_bytes if relay is not None else 0
        hwm = [proc_hwm_bytes(server.pid) for server in servers]
        if got.value != layer.size or drain.size != layer.size:
            raise ProtocolError(f"{case}: GetBlob said {got.value} bytes, read {drain.size}, expected {layer.size}")
        if hash_data and drain.sha256 != layer.digest:
            raise ProtocolError(f"{case}: read {drain.sha256}, expected {layer.digest}")
        parts = tuple(
            ProcessUse(end - begin, end - server.cpu0, peak)
            for server, begin, end, peak in zip(servers, server_cpu0, server_cpu_end, hwm, strict=True)
        )
        return BlobTransfer(
            case=case,
            round=round_no,
            protocol=str(version),
            bytes=layer.size,
            wall=wall,
            server_cpu=sum(part.cpu for part in parts),
            server_cpu_total=sum(part.cpu_total for part in parts),
            server_hwm=sum(hwm),
            client_cpu=client_cpu,
            registry_cpu=registry_cpu,
            relayed_setup=relayed0 if relay is not None else None,
            relayed_transfer=relayed1 - relayed0 if relay is not None else None,
            parts=parts,
        )
    except BaseException:
        print(f"{case} round {round_no} failed; server log tail:\n{client.log_tail()}", file=sys.stderr)
        raise
    finally:
        client.close()


# ------------------------------------------------------------------------------------------- the blob cache


def find_cached_blob(cache: Path, layer: Layer) -> Path | None:
    """The finished cache entry of ``layer`` under ``cache``: a regular file (any depth) whose name contains the
    layer's hex digest, does not end with ``.partial`` and whose size is the layer's. ``proxy/cache/store.py`` keeps
    it as ``DIR/blobs/sha256/<hex>``; the search does not depend on that layout. None if there is none."""
    hexpart = layer.digest.split(":", 1)[1]
    for path in sorted(cache.rglob(f"*{hexpart}*")):
        if path.is_symlink() or not path.is_file() or path.name.endswith(".partial"):
            continue
        if path.stat().st_size == layer.size:
            return path
    return None


def describe_tree(root: Path) -> str:
    """Every file under ``root`` with its size, one a line (for error messages)."""
    lines = [
        f"  {path.relative_to(root)}" + ("/" if path.is_dir() else f": {path.lstat().st_size:,} bytes")
        for path in sorted(root.rglob("*"))
    ]
    return "\n".join(lines) or "  (empty)"


# ------------------------------------------------------------------------------------------- references


@dataclass
class ReferenceRun:
    """One run of a reference command: its wall time and its CPU (``wait4`` rusage), over ``bytes``."""

    name: str
    round: int
    bytes: int
    wall: float
    cpu: float  # the command's user + system CPU (wait4 rusage)
    output: str = ""  # its stdout

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.wall

    @property
    def cpu_s_gb(self) -> float:
        return self.cpu / (self.bytes / GB)


def run_reference(name: str, round_no: int, argv: Sequence[str], size: int) -> ReferenceRun:
    """Run ``argv`` (a reference moving ``size`` bytes) to its end: wall time, CPU from ``wait4``, stdout kept.
    Fails if it exits with a non-zero status."""
    start = time.perf_counter()
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE)
    assert process.stdout is not None
    with process.stdout:
        output = process.stdout.read()  # small (a digest or one JSON line); EOF when the command exits
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return ReferenceRun(name, round_no, size, wall, usage.ru_utime + usage.ru_stime, output.decode(errors="replace"))


# The reference programs below are self-contained (they import what they use) so that ``reference_argv`` can run
# each one as ``python -S -c SOURCE``: the interpreter starts without site-packages and without this module's
# imports, and the command's CPU is the program's own.


def ref_hashlib(path: str, digest: str = "") -> None:
    """Reference: SHA-256 of a file read with ``readinto`` into one 1 MiB buffer (from the page cache once warm).
    Prints the digest; exits non-zero if it is not ``digest`` (when given)."""
    import hashlib
    import sys

    hasher = hashlib.sha256()
    view = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(view):
            hasher.update(view[:n])
    got = f"sha256:{hasher.hexdigest()}"
    print(got)
    if digest and got != digest:
        sys.exit(f"{path}: {got}, expected {digest}")


def ref_http_read(url: str, *options: str) -> None:
    """Reference: a blocking ``GET`` of ``url`` on a raw socket (for ``https``, an ``ssl.SSLSocket`` of an
    unverified context), the body read with ``recv_into`` into one 1 MiB buffer until Content-Length bytes have
    come. With ``--hash``, SHA-256 of the body inline, checked against the digest that ends the URL. Prints one JSON
    line (body bytes, TLS version and cipher); exits non-zero on anything but a 200 with a Content-Length."""
    import hashlib
    import json
    import socket
    import ssl
    import sys
    from urllib.parse import urlsplit

    hash_body = "--hash" in options
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    sock = socket.create_connection((host, port))
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname=host)
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: bench-reference\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(request.encode())
    view = memoryview(bytearray(1 << 20))
    head = bytearray()  # the response head, and whatever of the body came with it
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > 1 << 16:
            sys.exit(f"{url}: no end of the response head in {len(head)} bytes")
        n = sock.recv_into(view)
        if not n:
            sys.exit(f"{url}: connection closed in the response head")
        head += view[:n]
    status_line, *header_lines = head[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status_line.split()[1:2] != ["200"]:
        sys.exit(f"{url}: {status_line} (Location: {headers.get('location')})")
    if "transfer-encoding" in headers or "content-length" not in headers:
        sys.exit(f"{url}: no Content-Length ({headers})")
    length = int(headers["content-length"])
    body = head[end + 4 :]
    if len(body) > length:
        sys.exit(f"{url}: {len(body)} body bytes with the head, more than Content-Length {length}")
    hasher = hashlib.sha256(body if hash_body else b"")
    got = len(body)
    while got < length:
        n = sock.recv_into(view, min(len(view), length - got))
        if not n:
            sys.exit(f"{url}: connection closed after {got} of {length} body bytes")
        if hash_body:
            hasher.update(view[:n])
        got += n
    version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
    cipher = sock.cipher()[0] if isinstance(sock, ssl.SSLSocket) and sock.cipher() else None
    sock.close()
    if hash_body and f"sha256:{hasher.hexdigest()}" != parts.path.rsplit("/", 1)[1]:
        sys.exit(f"{url}: body is sha256:{hasher.hexdigest()}")
    print(json.dumps({"bytes": got, "tls_version": version, "cipher": cipher}))


REFERENCE_PROGRAMS: dict[str, Callable[..., None]] = {"ref-hashlib": ref_hashlib, "ref-http-read": ref_http_read}


def reference_argv(program: Callable[..., None], *args: str) -> list[str]:
    """The command line running one of the reference programs above in a fresh interpreter, ``python -S -c`` with
    the function's source (the same code ``python bench/common.py ref-...`` runs)."""
    source = f"{inspect.getsource(program)}\nimport sys\n{program.__name__}(*sys.argv[1:])\n"
    return [sys.executable, "-S", "-c", source, *args]


# ------------------------------------------------------------------------------------------- the start of a bench


@dataclass(frozen=True)
class BenchStart:
    """What a bench's ``main()`` starts with: the machine it runs on, its work directory, its progress lines."""

    machine: dict[str, str]
    workdir: Path
    verbose: bool

    def progress(self, message: str) -> None:
        """A progress line on stdout, unless ``-q``."""
        if self.verbose:
            print(message, flush=True)


def start_bench(workdir: str | None, prefix: str, verbose: bool) -> BenchStart | None:
    """Check that skopeo and docker-registry are installed (if not: None, having said on stderr which one is
    missing), describe the machine, and make the work directory (``workdir``, or a new temporary one named
    ``prefix...``)."""
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists():
            print(f"{tool} is required (apt-get install {tool})", file=sys.stderr)
            return None
    machine = machine_info()
    path = Path(workdir or tempfile.mkdtemp(prefix=prefix)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return BenchStart(machine, path, verbose)


# ------------------------------------------------------------------------------------------- report helpers


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            return (result.stdout or result.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "skopeo": version(["skopeo", "--version"]),
        "registry": version([shutil.which("docker-registry") or "docker-registry", "--version"]),
    }


def median_range(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> str:
    """median(a) / median(b) to 2 decimals, or ``n/a`` when median(b) is 0."""
    base = statistics.median(b)
    return f"{statistics.median(a) / base:.2f}" if base else "n/a"


def report_header(machine: dict[str, str]) -> list[str]:
    """The date, machine and tool version lines that open a report."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, Python {machine['python']}",
        f"- {machine['skopeo']}; {machine['registry']}",
    ]


def write_report(out: Path, report: str, begin_mark: str, end_mark: str) -> None:
    """Replace the section of ``out`` between ``begin_mark`` and ``end_mark`` with ``report`` (which starts and
    ends with them), or append it; the rest of the file (other benches' sections, notes) stays as it was."""
    text = out.read_text() if out.exists() else ""
    begin = text.find(begin_mark)
    end = text.find(end_mark, begin) if begin >= 0 else -1
    if end >= 0:
        after = text[end + len(end_mark) :].lstrip("\n")
        text = text[:begin] + report + ("\n" + after if after else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + report
    out.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in REFERENCE_PROGRAMS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(REFERENCE_PROGRAMS)}}} ARGS...")
    REFERENCE_PROGRAMS[sys.argv[1]](*sys.argv[2:])
