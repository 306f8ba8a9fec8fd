"""Shared parts of the benchmarks: a docker-registry on loopback, the one-layer image pushed into it, a small
synchronous client of the proxy protocol over a ``SOCK_SEQPACKET`` socketpair, a pipe drain, /proc readers and
the report helpers. Standard library only.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
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


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------- registry


@dataclass
class RunningRegistry:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_url(self, digest: str) -> str:
        return f"http://{self.authority}/v2/{REPOSITORY}/blobs/{digest}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def docker_registry(workdir: Path) -> Iterator[RunningRegistry]:
    """A plain-HTTP, no-auth docker-registry on 127.0.0.1 storing under ``workdir`` until the block ends."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    port = _free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "bench-secret-not-for-production"},
    }
    config_path = workdir / "config.yml"  # YAML is a superset of JSON
    config_path.write_text(json.dumps(config))
    log = workdir / "registry.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "serve", str(config_path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield RunningRegistry(process, port, log)
    finally:
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


def build_layout(layout: Path, content_size: int) -> tuple[Layer, str]:
    """An OCI layout with one image (tag ``latest``) whose one layer is a gzip-level-0 tar of one file of
    ``content_size`` random bytes; written in 1 MiB steps, never held in memory. Returns (layer, diff_id)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))

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

        info = tarfile.TarInfo("random.bin")
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
    layer = Layer(path, f"sha256:{blob_hash.hexdigest()}", size)
    diff_id = f"sha256:{diff_hash.hexdigest()}"

    config = _canonical(
        {
            "created": "2024-01-02T03:04:05Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "bench/blob_throughput.py"}],
        }
    )
    config_digest, config_size = _write_blob(layout, config)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}],
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
    return layer, diff_id


def push(layout: Path, registry: RunningRegistry, timeout: float) -> None:
    argv = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"oci:{layout}:{TAG}",
        f"docker://{registry.authority}/{REPOSITORY}:{TAG}",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


# ------------------------------------------------------------------------------------------- client


class ProtocolError(RuntimeError):
    pass


@dataclass
class Reply:
    value: Any
    pipeid: int
    fds: list[int]


class ProxyClient:
    """One server process on the far end of a SOCK_SEQPACKET socketpair (its stdin)."""

    def __init__(self, argv: Sequence[str], log: Path, timeout: float) -> None:
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log = log
        try:
            with log.open("wb") as out:
                self.process: subprocess.Popen[bytes] = subprocess.Popen(
                    list(argv), stdin=child.fileno(), stdout=out, stderr=out, cwd=REPO_ROOT
                )
        finally:
            child.close()
        self.sock.settimeout(timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, method: str, *args: Any) -> Reply:
        self.sock.send(json.dumps({"method": method, "args": list(args)}).encode())
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
        if not reply.get("success"):
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{method} failed: {reply.get('error')!r}")
        return Reply(reply.get("value"), int(reply.get("pipeid") or 0), list(fds))

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

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
    """Reads a pipe fd to EOF in a thread, hashing every byte."""

    fd: int
    read_size: int
    hash_data: bool
    size: int = 0
    sha256: str = ""
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
