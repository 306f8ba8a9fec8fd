#!/usr/bin/env python3
"""GetBlob throughput of a large blob from a real docker-registry on loopback: our proxy against skopeo's.

Set-up: a docker-registry on 127.0.0.1 with a temporary storage directory, an OCI layout holding one image whose
only layer is ``--size-mib`` MiB of random (incompressible) bytes in a tar, wrapped in gzip level 0 (stored
blocks: no compression work anywhere, and skopeo pushes it unchanged), pushed with ``skopeo copy``.

Each round spawns a server over a ``SOCK_SEQPACKET`` socketpair (the socket on its stdin), ours then skopeo's,
and runs Initialize, OpenImage, GetBlob, FinishPipe with a small synchronous client: the pipe fd is drained by a
thread (large reads, SHA-256 of every byte) while the main thread waits for the FinishPipe reply. See
bench/README.md for what each number means.

Run from the repository root: ``python bench/blob_throughput.py [--size-mib 1024] [--rounds 3]``.
Only the standard library is used; ``--py-spy-out`` needs py-spy (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
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

OURS = "ours"
SKOPEO = "skopeo"


def server_argv(name: str) -> list[str]:
    if name == OURS:
        return [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false"]
    return ["skopeo", "experimental-image-proxy", "--tls-verify=false"]


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


# ------------------------------------------------------------------------------------------- measurements


@dataclass
class ServerRun:
    server: str
    round: int
    bytes: int
    wall: float  # GetBlob sent -> FinishPipe reply received and pipe at EOF
    server_cpu: float  # server CPU during the transfer
    server_cpu_total: float  # server CPU from exec to just before Shutdown
    server_hwm: int  # VmHWM just before Shutdown
    client_cpu: float  # this process's CPU during the transfer
    registry_cpu: float  # docker-registry's CPU during the transfer

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.wall

    def per_gb(self, seconds: float) -> float:
        return seconds / (self.bytes / GB)


@dataclass
class ReferenceRun:
    name: str
    round: int
    bytes: int
    wall: float
    cpu: float  # the command's user + system CPU (wait4 rusage)

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.wall


def run_server(
    name: str,
    round_no: int,
    registry: RunningRegistry,
    layer: Layer,
    workdir: Path,
    args: argparse.Namespace,
    argv: Sequence[str] | None = None,
) -> ServerRun:
    client = ProxyClient(argv or server_argv(name), workdir / f"{name}-{round_no}.log", args.timeout)
    try:
        version = client.call("Initialize").value
        image = client.call("OpenImage", f"docker://{registry.authority}/{REPOSITORY}:{TAG}").value
        registry_cpu0 = proc_cpu(registry.process.pid)
        server_cpu0 = proc_cpu(client.pid)
        client_cpu0 = self_cpu()
        start = time.perf_counter()
        got = client.call("GetBlob", image, layer.digest, layer.size)
        if len(got.fds) != 1:
            raise ProtocolError(f"GetBlob sent {len(got.fds)} fds")
        drain = Drain(got.fds[0], args.read_size_kib * 1024, not args.no_hash)
        try:
            client.call("FinishPipe", got.pipeid)
        finally:
            drain.join(args.timeout)
        wall = time.perf_counter() - start
        client_cpu = self_cpu() - client_cpu0
        server_cpu_end = proc_cpu(client.pid)
        registry_cpu = proc_cpu(registry.process.pid) - registry_cpu0
        hwm = proc_hwm_bytes(client.pid)
        if got.value != layer.size or drain.size != layer.size:
            raise ProtocolError(f"{name}: GetBlob said {got.value} bytes, read {drain.size}, expected {layer.size}")
        if not args.no_hash and drain.sha256 != layer.digest:
            raise ProtocolError(f"{name}: read {drain.sha256}, expected {layer.digest}")
        if args.verbose:
            print(f"  {name} (protocol {version}) round {round_no}: {layer.size / MB / wall:.0f} MB/s", flush=True)
        return ServerRun(
            server=name,
            round=round_no,
            bytes=layer.size,
            wall=wall,
            server_cpu=server_cpu_end - server_cpu0,
            server_cpu_total=server_cpu_end,
            server_hwm=hwm,
            client_cpu=client_cpu,
            registry_cpu=registry_cpu,
        )
    except BaseException:
        print(f"{name} round {round_no} failed; server log tail:\n{client.log_tail()}", file=sys.stderr)
        raise
    finally:
        client.close()


def run_reference(name: str, round_no: int, argv: Sequence[str], size: int) -> ReferenceRun:
    start = time.perf_counter()
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return ReferenceRun(name, round_no, size, wall, usage.ru_utime + usage.ru_stime)


def profile_ours(registry: RunningRegistry, layer: Layer, workdir: Path, args: argparse.Namespace) -> None:
    """One extra, unmeasured transfer with our server under ``py-spy record`` (collapsed stacks / flamegraph)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.py_spy_out).resolve()
    fmt = "flamegraph" if out.suffix == ".svg" else "raw"
    argv = [py_spy, "record", "--rate", "250", "--format", fmt, "--output", str(out), "--", *server_argv(OURS)]
    run = run_server(OURS, 0, registry, layer, workdir, args, argv=argv)
    print(f"py-spy: {run.mb_s:.0f} MB/s under the profiler, profile in {out}", flush=True)


# ------------------------------------------------------------------------------------------- report


def _machine() -> dict[str, str]:
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


def _stat(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


METRICS: list[tuple[str, str, Callable[[ServerRun], float]]] = [
    ("throughput, MB/s (higher is better)", ".0f", lambda r: r.mb_s),
    ("transfer wall time, s", ".2f", lambda r: r.wall),
    ("server CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.server_cpu)),
    ("server CPU, whole process, s", ".2f", lambda r: r.server_cpu_total),
    ("server peak RSS (VmHWM), MiB", ".1f", lambda r: r.server_hwm / MIB),
    ("client CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.client_cpu)),
    ("registry CPU during transfer, s/GB", ".2f", lambda r: r.per_gb(r.registry_cpu)),
]


def render(
    runs: list[ServerRun], refs: list[ReferenceRun], layer: Layer, args: argparse.Namespace, machine: dict[str, str]
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    hashing = "off (--no-hash)" if args.no_hash else "on (SHA-256 of every byte, checked against the digest)"
    lines = [
        "# GetBlob throughput: image-proxy vs skopeo experimental-image-proxy",
        "",
        f"- date: {now}",
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, Python {machine['python']}",
        f"- {machine['skopeo']}; {machine['registry']}",
        f"- blob: {layer.size:,} bytes ({args.size_mib} MiB of random bytes in a tar, gzip level 0), "
        f"docker-registry on 127.0.0.1 (plain HTTP, filesystem storage, page cache warm)",
        f"- rounds: {args.rounds}, alternating {OURS}, {SKOPEO}, {OURS}, {SKOPEO}, ...; "
        f"client read size {args.read_size_kib} KiB; client hashing {hashing}",
        "- **the machine is shared and noisy**: treat differences under ~10-15 % as noise; the min to max ranges show "
        "the spread",
        "",
        "Median (min to max) over the rounds; ratio = ours / skopeo of the medians.",
        "",
        f"| metric | {OURS} | {SKOPEO} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, fmt, get in METRICS:
        ours = [get(r) for r in runs if r.server == OURS]
        theirs = [get(r) for r in runs if r.server == SKOPEO]
        base = statistics.median(theirs)
        ratio = f"{statistics.median(ours) / base:.2f}" if base else "n/a"
        lines.append(f"| {label} | {_stat(ours, fmt)} | {_stat(theirs, fmt)} | {ratio} |")
    if refs:
        lines += ["", "References (same blob, same rounds):", "", "| reference | MB/s | CPU s/GB |", "|---|---:|---:|"]
        for name in dict.fromkeys(r.name for r in refs):
            mine = [r for r in refs if r.name == name]
            cpu = [r.cpu / (r.bytes / GB) for r in mine]
            lines.append(f"| {name} | {_stat([r.mb_s for r in mine], '.0f')} | {_stat(cpu, '.2f')} |")
    lines += [
        "",
        "Every round:",
        "",
        "| round | server | MB/s | wall s | server CPU s | whole-process CPU s | peak RSS MiB | client CPU s "
        "| registry CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.round} | {r.server} | {r.mb_s:.0f} | {r.wall:.2f} | {r.server_cpu:.2f} | {r.server_cpu_total:.2f} "
            f"| {r.server_hwm / MIB:.1f} | {r.client_cpu:.2f} | {r.registry_cpu:.2f} |"
        )
    lines += ["", "Produced by `python bench/blob_throughput.py`; see bench/README.md.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="layer content size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs ours then skopeo (default 3)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="Markdown report to write")
    parser.add_argument("--read-size-kib", type=int, default=1024, help="client read size per read (default 1024)")
    parser.add_argument("--no-hash", action="store_true", help="do not SHA-256 the bytes in the client")
    parser.add_argument("--no-references", action="store_true", help="skip the sha256sum and curl references")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on every reply and on the drain, s")
    parser.add_argument("--workdir", help="where to put the layout and registry storage (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--py-spy-out", help="after the rounds, profile one transfer of ours with py-spy into FILE")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress lines")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1 or args.read_size_kib < 1:
        parser.error("--size-mib, --rounds and --read-size-kib must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists():
            print(f"{tool} is required (apt-get install {tool})", file=sys.stderr)
            return 2
    machine = _machine()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blob-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def progress(message: str) -> None:
        if args.verbose:
            print(message, flush=True)

    try:
        started = time.perf_counter()
        layer, _ = build_layout(workdir / "layout", args.size_mib * MIB)
        progress(f"layout: {layer.size:,} bytes, {layer.digest} ({time.perf_counter() - started:.1f} s)")
        with docker_registry(workdir / "registry") as registry:
            started = time.perf_counter()
            push(workdir / "layout", registry, args.timeout)
            progress(f"pushed to {registry.authority}/{REPOSITORY}:{TAG} ({time.perf_counter() - started:.1f} s)")
            curl = shutil.which("curl")
            curl_argv = [curl, "-s", "-f", "-o", "/dev/null", registry.blob_url(layer.digest)] if curl else None
            if curl_argv:  # warm the registry's page cache and check the blob is served
                run_reference("warm-up", 0, curl_argv, layer.size)
            runs: list[ServerRun] = []
            refs: list[ReferenceRun] = []
            for round_no in range(1, args.rounds + 1):
                for name in (OURS, SKOPEO):
                    runs.append(run_server(name, round_no, registry, layer, workdir, args))
                if not args.no_references:
                    refs.append(
                        run_reference(
                            "sha256sum of the layer file", round_no, ["sha256sum", str(layer.path)], layer.size
                        )
                    )
                    if curl_argv:
                        refs.append(
                            run_reference("curl -s -o /dev/null of the blob URL", round_no, curl_argv, layer.size)
                        )
            if args.py_spy_out:
                profile_ours(registry, layer, workdir, args)
        report = render(runs, refs, layer, args, machine)
        Path(args.out).write_text(report)
        print(report)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
