"""Debian's nginx as a registry made of static files: ``/v2/`` answers 200, manifests and blobs are files
under ``/v2/<repo>/manifests/<tag or digest>`` and ``/v2/<repo>/blobs/<digest>``.

nginx answers ``Range`` requests on static files itself: several ranges as multipart/byteranges, or, with
``max_ranges 1``, a multi-range request as if it had no Range at all (200 and the whole file): what S3 and ECR
do. Everything lives in a temporary prefix (config, pid, logs, temp paths); nginx runs in the foreground
(``daemon off``) on 127.0.0.1 and is stopped with the fixture. Nothing outside the prefix is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

from tests.http.registry import free_port
from tests.support.registry import answers_v2

NGINX_HINT = "nginx is required for the partial-access tests: apt-get install nginx (./setup.sh --test does)"
READY_TIMEOUT = 20.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if path is None:
        pytest.fail(NGINX_HINT, pytrace=False)
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StaticRegistry:
    """The files nginx serves: images written as manifests, configs and blobs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put_blob(self, repository: str, data: bytes) -> str:
        digest = sha256(data)
        path = self.root / "v2" / repository / "blobs" / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(data)
        return digest

    def put_image(self, repository: str, layers: list[dict], blobs: list[bytes], tag: str = "latest") -> str:
        """An OCI image whose layer descriptors are ``layers`` (blobs written from ``blobs``)."""
        for blob in blobs:
            self.put_blob(repository, blob)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [sha256(b"%d" % i) for i in range(len(layers))]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": self.put_blob(repository, config), "size": len(config)},
                "layers": layers,
            }
        ).encode()
        folder = self.root / "v2" / repository / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / tag).write_bytes(manifest)
        (folder / sha256(manifest)).write_bytes(manifest)
        return sha256(manifest)


@attrs.frozen
class LogEntry:
    """One line of the access log: a request as nginx finished it."""

    request: str  # "GET /v2/... HTTP/1.1"
    range: str  # the Range header, "" without one
    status: int
    body_bytes_sent: int  # body bytes nginx handed to the kernel, whether or not the client read them

    @property
    def path(self) -> str:
        """The request's target; "" for what was no HTTP request (a TLS ClientHello)."""
        words = self.request.split(" ")
        return words[1] if len(words) == 3 else ""


@attrs.frozen
class Nginx:
    port: int
    max_ranges: int | None
    prefix: Path

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def log_size(self) -> int:
        """Where the access log ends now: pass it to ``log_entries`` to see only what comes after."""
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def log_entries(self, since: int = 0) -> list[LogEntry]:
        """The access log's complete lines from byte ``since`` on (nginx writes a line when it finishes a
        request: for one the client abandoned, when it notices the connection is gone)."""
        with self.access_log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")  # a TLS ClientHello (the daemon tries https first) is logged raw
        lines = text.split("\n")[:-1]  # the last piece is empty, or a line still being written
        return [LogEntry(**json.loads(line)) for line in lines]


def _config(prefix: Path, root: Path, port: int, max_ranges: int | None) -> str:
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must read files in a 0700 temp dir
    limit = f"max_ranges {max_ranges};" if max_ranges is not None else ""
    temp = "\n".join(
        f"    {name}_temp_path {prefix}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 128; }}
http {{
    log_format entries escape=json '{{"request": "$request", "range": "$http_range", "status": $status, '
                                   '"body_bytes_sent": $body_bytes_sent}}';
    access_log {prefix}/access.log entries;
{temp}
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {limit}
        location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
        location = /nginx-status {{ stub_status; access_log off; }}
        location ~ ^/v2/.+/manifests/ {{ default_type {OCI_MANIFEST}; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_process(prefix: Path, root: Path, max_ranges: int | None = None) -> Iterator[Nginx]:
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_config(prefix, root, port, max_ranges))
    log = prefix / "stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not answers_v2(port, statuses=(200,)):
            if process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace") + (prefix / "error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx did not start:\n{text[-2000:]}")
            time.sleep(0.05)  # polling interval, not synchronisation
        yield Nginx(port, max_ranges, prefix)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def active_connections(port: int) -> int:
    """nginx's count of open client connections (stub_status), this one included."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=READY_TIMEOUT)
    try:
        conn.request("GET", "/nginx-status")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(text.split("\n", 1)[0].removeprefix("Active connections:").strip())


async def settled_log(nginx: Nginx, since: int, timeout: float = 10.0) -> list[LogEntry]:
    """The access-log entries after byte ``since``, once nginx has no connection left but the one asking: it
    logs a request before it closes its connection (one the client abandoned: once it notices), so every
    request of clients that are gone is then in the log."""
    with trio.fail_after(timeout):
        while active_connections(nginx.port) > 1:
            await trio.sleep(0.02)  # polling nginx; the deadline above bounds the wait
    return nginx.log_entries(since)
