"""What runs on the fleet's hosts (tests/fleet/netns.py): the upstream registry, the cache host, the nodes' daemons.

- **upstream**: a docker-registry on ``<upstream>:5000`` (plain HTTP) holding the image, pushed by the real skopeo
  from inside that host.
- **cache**: a docker-registry in pull-through mode (``proxy: remoteurl:``) on 127.0.0.1:5000 of the cache host,
  behind one nginx process with two servers:

  - the *front*, ``https://<cache>:443`` with a certificate from the fleet's test CA: what the nodes' registries.conf
    names as the mirror. Like Kraken's agent (kraken#631) it answers **404** for a request its backend fails with
    500/502/504 -- the registry answers 500 for a blob it cannot get from its upstream -- and, while the file
    ``maintenance`` exists, **503** for everything (a cache host being drained). Its backend is the registry, or a
    fault proxy in front of it (``backend_port``).
  - the *egress*, 127.0.0.1:8080, the registry's ``remoteurl``: passes requests to the upstream and keeps blobs with
    ``proxy_cache_lock``. distribution 2.8's proxy mode fetches a cold blob twice for one request (once to store it,
    once to answer) and once more for every other request that comes while it is being stored; the egress cache
    folds those into one request upstream, which is what a fleet's pull-through cache must achieve (measured in
    docs/FLEET.md).
- **node**: ``image-proxy daemon`` with its own ``$HOME``: ``~/.config/containers/registries.conf`` naming the
  mirrors, and ``~/.config/containers/certs.d/<cache>/ca.crt`` trusting the cache host's CA (per-mirror TLS); the
  upstream is ``insecure = true`` (plain HTTP). Its unix socket is in the test's directory, so the test process (in
  the root namespace) talks to it with the client bindings.

No network connection is made from the root namespace: probes run inside the hosts (:meth:`Host.call`).
Processes are started in their own process group and stopped (or killed, with their nginx workers) by that id.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import trustme

from tests.fleet.netns import Host
from tests.support.images import BuiltImage

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "fleet/os"
REGISTRY_PORT = 5000
EGRESS_PORT = 8080
#: how long a registry, nginx or daemon may take to answer after it was started (a loaded 2-core machine)
READY_TIMEOUT = 30.0
#: how long a stopped process may take to exit before it is killed
STOP_TIMEOUT = 5.0
#: polling interval of readiness probes (not a synchronisation: each probe checks the real condition)
POLL = 0.05


class HostFailed(RuntimeError):
    """A component of the fleet did not start; the message has its log's tail."""


def find(name: str, *fallbacks: str) -> str:
    path = shutil.which(name) or next((f for f in fallbacks if os.access(f, os.X_OK)), None)
    if path is None:
        raise HostFailed(f"the fleet needs {name!r}: ./setup.sh --test installs it (apt-get install {name})")
    return path


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Process:
    """A process started on a host, in a process group of its own (nginx's workers included)."""

    def __init__(self, host: Host, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.host = host
        self.log = log
        self.argv = list(argv)
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                host.command(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The program's own pid (``ip netns exec`` execs it)."""
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole group: a host losing the program at once (connections reset by its kernel)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):  # what is left of the group (nginx workers)
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_TIMEOUT)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.popen.poll() is not None:
                raise HostFailed(f"{what} exited ({self.popen.returncode}):\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise HostFailed(f"{what} not ready within {timeout} s:\n{_tail(self.log)}")
            time.sleep(POLL)


def http_status(
    host: Host, address: str, port: int, path: str = "/v2/", tls: ssl.SSLContext | None = None, timeout: float = 5.0
) -> int | None:
    """The status of ``GET path`` at ``address:port`` as seen from ``host`` (None: no HTTP answer)."""

    def probe() -> int | None:
        if tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(address, port, timeout=timeout, context=tls)
        else:
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    return host.call(probe, timeout=timeout + 5)


# ------------------------------------------------------------------------------------------------ access logs


@attrs.frozen
class Access:
    """One request as a server logged it."""

    client: str
    method: str
    path: str
    status: int
    bytes: int  # response body bytes sent

    @property
    def blob(self) -> str | None:
        """The digest, for a request of a blob."""
        found = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", self.path.split("?", 1)[0])
        return found.group(1) if found else None


_REGISTRY_LINE = re.compile(r'^(\S+) \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')


class AccessLog:
    """A server's access log, read from an offset on: ``mark()`` now, ``entries(since=mark)`` later."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind  # "registry" (combined format in its output) or "nginx" (one JSON object a line)

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def entries(self, since: int = 0) -> list[Access]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").split("\n")[:-1]  # the last piece: "" or a partial line
        found = []
        for line in lines:
            if self.kind == "nginx":
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                method, _, rest = doc["request"].partition(" ")
                found.append(Access(doc["client"], method, rest.rsplit(" ", 1)[0], doc["status"], doc["bytes"]))
            elif match := _REGISTRY_LINE.match(line):
                client, method, path, status, size = match.groups()
                found.append(Access(client, method, path, int(status), 0 if size == "-" else int(size)))
        return found

    def blob_gets(self, since: int = 0, client: str | None = None) -> list[Access]:
        """GETs of blobs (any status), optionally only from ``client``."""
        return [
            e
            for e in self.entries(since)
            if e.method == "GET" and e.blob is not None and (client is None or e.client == client)
        ]


# ------------------------------------------------------------------------------------------------ registries


def registry_config(storage: Path, listen: str, remote: str | None = None) -> str:
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": listen, "secret": "fleet-test-secret-not-for-production"},
    }
    if remote is not None:
        config["proxy"] = {"remoteurl": remote}
    return json.dumps(config, indent=2)  # YAML is a superset of JSON


def _registry_environment() -> dict[str, str]:
    # REGISTRY_* variables override the configuration file; keep the machine's out
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


@attrs.define
class Upstream:
    host: Host
    process: Process
    workdir: Path

    @property
    def authority(self) -> str:
        return f"{self.host.address}:{REGISTRY_PORT}"

    @property
    def access(self) -> AccessLog:
        return AccessLog(self.process.log, "registry")

    def reference(self, tag: str = "latest") -> str:
        return f"docker://{self.authority}/{REPOSITORY}:{tag}"


def start_registry(host: Host, workdir: Path, listen_host: str, remote: str | None = None) -> Process:
    """A docker-registry on ``listen_host:5000`` of ``host`` (pull-through when ``remote`` is given), ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "storage").mkdir(exist_ok=True)
    config = workdir / "registry.yml"
    config.write_text(registry_config(workdir / "storage", f"{listen_host}:{REGISTRY_PORT}", remote))
    binary = find("docker-registry", "/usr/bin/docker-registry")
    process = Process(host, [binary, "serve", str(config)], workdir / "registry.log", env=_registry_environment())
    address = host.address if listen_host == "0.0.0.0" else listen_host
    process.wait_until(
        lambda: http_status(host, address, REGISTRY_PORT) == 200, f"docker-registry on {host.role} ({workdir})"
    )
    return process


def start_upstream(host: Host, workdir: Path, image: BuiltImage, layout_tag: str) -> Upstream:
    """The upstream registry holding ``image`` as fleet/os:latest, pushed by skopeo running on the upstream host."""
    process = start_registry(host, workdir, "0.0.0.0")
    skopeo = find("skopeo", "/usr/bin/skopeo")
    argv = [
        skopeo,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"oci:{image.path}:{layout_tag}",
        f"docker://127.0.0.1:{REGISTRY_PORT}/{REPOSITORY}:latest",
    ]
    result = subprocess.run(host.command(argv), capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        process.stop()
        raise HostFailed(f"skopeo copy to the upstream failed ({result.returncode}): {result.stderr.strip()}")
    return Upstream(host, process, workdir)


# ------------------------------------------------------------------------------------------------ the cache host


def _nginx_config(
    prefix: Path, front: str, backend_port: int, upstream: str, cert: Path, key: str, rate: str | None
) -> str:
    user = "user root root;" if os.geteuid() == 0 else ""  # workers read files in 0700 temporary directories
    temp = "\n".join(f"    {n}_temp_path {prefix}/{n};" for n in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    unavailable = '{"errors":[{"code":"BLOB_UNKNOWN","message":"backend unavailable","detail":null}]}'
    maintenance = '{"errors":[{"code":"UNAVAILABLE","message":"maintenance","detail":null}]}'
    return f"""
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format entries escape=json '{{"client": "$remote_addr", "request": "$request", "status": $status, '
                                   '"bytes": $body_bytes_sent}}';
{temp}
    proxy_cache_path {prefix}/egress-cache levels=1:2 keys_zone=blobs:4m max_size=4g inactive=1h use_temp_path=off;
    # the egress: the pull-through registry's remote; one request upstream per blob, however many ask at once
    server {{
        listen 127.0.0.1:{EGRESS_PORT};
        access_log {prefix}/egress.log entries;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host {upstream};
        location / {{ proxy_pass http://{upstream}; }}
        location ~ ^/v2/.+/blobs/sha256: {{
            proxy_pass http://{upstream};
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 120s;
            proxy_cache_lock_age 120s;
        }}
    }}
    # the front: what the nodes' registries.conf names as their mirror
    server {{
        listen {front}:443 ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        access_log {prefix}/front.log entries;
        client_max_body_size 0;
        location /v2/ {{
            if (-f {prefix}/maintenance) {{
                add_header Content-Type application/json always;
                return 503 '{maintenance}';
            }}
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering {"on" if rate else "off"};  # limit_rate needs buffering; without it, no delay
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            {f"limit_rate {rate};" if rate else ""}
            proxy_intercept_errors on;
            error_page 500 502 504 =404 @backend_unavailable;
        }}
        location @backend_unavailable {{
            default_type application/json;
            return 404 '{unavailable}';
        }}
    }}
}}
"""


@attrs.define
class CacheHost:
    host: Host
    workdir: Path
    nginx: Process
    registry: Process

    @property
    def authority(self) -> str:
        """What registries.conf names (https, port 443)."""
        return self.host.address

    @property
    def front(self) -> AccessLog:
        """Every request of the nodes, with their address and what was answered."""
        return AccessLog(self.workdir / "front.log", "nginx")

    @property
    def registry_access(self) -> AccessLog:
        return AccessLog(self.registry.log, "registry")

    @property
    def maintenance(self) -> Path:
        return self.workdir / "maintenance"

    def set_maintenance(self, on: bool) -> None:
        """503 for every request (on) or normal service (off), from the next request on."""
        if on:
            self.maintenance.write_text("draining\n")
        else:
            self.maintenance.unlink(missing_ok=True)

    def kill(self) -> None:
        """The host stops: nginx (workers too) and the registry die at once; their connections are reset."""
        self.nginx.kill()
        self.registry.kill()

    def stop(self) -> None:
        self.nginx.stop()
        self.registry.stop()


def start_cache(
    host: Host,
    workdir: Path,
    upstream: Upstream,
    ca: trustme.CA,
    backend_port: int = REGISTRY_PORT,
    rate: str | None = None,
) -> CacheHost:
    """The cache host, empty, ready (its front answers ``GET /v2/`` with 200 over TLS). ``rate`` (nginx's
    ``limit_rate``, e.g. ``"4m"``) caps what the front sends on each connection."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    issued = ca.issue_cert(host.address)
    key.write_bytes(issued.private_key_pem.bytes())
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_config(workdir, host.address, backend_port, upstream.authority, cert, str(key), rate))
    binary = find("nginx", "/usr/sbin/nginx")
    argv = [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    nginx = Process(host, argv, workdir / "nginx.out")
    try:
        nginx.wait_until(lambda: http_status(host, "127.0.0.1", EGRESS_PORT) == 200, f"nginx on {host.role}")
        registry = start_registry(host, workdir / "registry", "127.0.0.1", f"http://127.0.0.1:{EGRESS_PORT}")
    except BaseException:
        nginx.stop()
        raise
    cache = CacheHost(host, workdir, nginx, registry)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        nginx.wait_until(
            lambda: http_status(host, host.address, 443, tls=context) == 200, f"the cache front on {host.address}"
        )
    except BaseException:
        cache.stop()
        raise
    return cache


# ------------------------------------------------------------------------------------------------ nodes


def registries_conf(upstream: str, mirrors: Sequence[tuple[str, bool]]) -> str:
    """The upstream (plain HTTP: insecure) with ``mirrors`` ((location, insecure), tried in this order)."""
    text = f'[[registry]]\nprefix = "{upstream}"\nlocation = "{upstream}"\ninsecure = true\n'
    for location, insecure in mirrors:
        text += f'\n[[registry.mirror]]\nlocation = "{location}"\n'
        if insecure:
            text += "insecure = true\n"
    return text


@attrs.define
class Node:
    host: Host
    workdir: Path
    process: Process

    @property
    def socket(self) -> Path:
        return self.workdir / "daemon.sock"

    @property
    def address(self) -> str:
        return self.host.address

    def log_text(self) -> str:
        return self.process.log.read_text(errors="replace")


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def start_node(
    host: Host,
    workdir: Path,
    conf: str,
    ca: trustme.CA,
    mirror_authorities: Sequence[str],
    flags: Sequence[str] = (),
    blob_cache: bool = True,
) -> Node:
    """``image-proxy daemon`` on ``host``: its $HOME holds ``conf`` as registries.conf and the CA in certs.d for
    each of ``mirror_authorities`` (the TLS mirrors). Returns once its socket accepts connections."""
    home = workdir / "home"
    containers = home / ".config" / "containers"
    containers.mkdir(parents=True, exist_ok=True)
    (containers / "registries.conf").write_text(conf)
    for authority in mirror_authorities:
        certs = containers / "certs.d" / authority
        certs.mkdir(parents=True, exist_ok=True)
        ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    argv = [sys.executable, "-m", "proxy", "daemon", "--listen", str(workdir / "daemon.sock"), *flags]
    argv += ["--blob-cache", str(workdir / "blobs")] if blob_cache else ["--no-blob-cache"]
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    process = Process(host, argv, workdir / "daemon.log", env=env)
    node = Node(host, workdir, process)
    try:
        process.wait_until(lambda: _accepts(node.socket), f"image-proxy daemon on {host.role}")
    except BaseException:
        process.stop()
        raise
    return node


@contextlib.contextmanager
def nodes_running(
    hosts: Sequence[Host],
    workdir: Path,
    conf: str,
    ca: trustme.CA,
    mirror_authorities: Sequence[str],
    flags: Sequence[str] = (),
    blob_cache: bool = True,
) -> Iterator[list[Node]]:
    """One daemon per host (started one after the other; each is ready when returned), stopped at the end."""
    started: list[Node] = []
    try:
        for host in hosts:
            started.append(
                start_node(host, workdir / host.role, conf, ca, mirror_authorities, flags, blob_cache=blob_cache)
            )
        yield started
    finally:
        for node in started:
            node.process.stop()


# ------------------------------------------------------------------------------------------------ the image


def build_image(root: Path, layer_sizes: Sequence[int], tag: str = "fleet") -> BuiltImage:
    """An OCI layout under ``root`` holding one image of one layer per size (incompressible bytes stored as gzip
    level 0, so skopeo pushes the blobs unchanged), tagged ``tag``."""
    from tests.support.images import ImageSpec, LayerSpec, build_oci_layout, pseudo_random

    layers = tuple(
        LayerSpec({f"layer-{i}.bin": pseudo_random(f"fleet-{i}", size)}, f"COPY layer-{i}.bin /")
        for i, size in enumerate(layer_sizes)
    )
    layout = build_oci_layout(root, {tag: ImageSpec(layers=layers, gzip_level=0)})
    return layout.images[tag]
