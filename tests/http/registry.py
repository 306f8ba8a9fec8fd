"""The real Debian ``docker-registry`` (distribution 2.8) as a test fixture.

``run_registry(workdir, options)`` starts one on 127.0.0.1 (a free port, storage under ``workdir``), waits until
``GET /v2/`` answers (any status: 401 counts, for the htpasswd variant), yields a :class:`Registry`, and stops the
process afterwards. :class:`RegistryOptions` has TLS, htpasswd (see :func:`write_htpasswd`) and token-auth
(:class:`TokenAuth`, e.g. from ``tests.http.token_issuer``) settings. The ``docker_registry`` fixture is the
plain-HTTP, no-auth variant.

A missing binary fails the test (it does not skip): the suite is meant to run against the real thing.
Readiness is checked with a minimal h11 exchange written here, independent of the client under test.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

INSTALL_HINT = (
    "the real registry is needed for this test: install the Debian package 'docker-registry' "
    "(apt-get install docker-registry, distribution 2.8, provides /usr/bin/docker-registry)"
)
#: how long the registry may take to answer its first GET /v2/ (a loaded 2-core machine)
READY_TIMEOUT = 30.0
#: how long a terminated registry may take to exit before it is killed
STOP_TIMEOUT = 5.0


@attrs.frozen
class TokenAuth:
    """``auth: token:``: the registry sends clients to ``realm`` and trusts tokens that ``issuer`` signed for
    ``service`` with a key certified by ``rootcertbundle`` (a PEM file)."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path

    @classmethod
    def from_config(cls, config: dict[str, str]) -> TokenAuth:
        return cls(config["realm"], config["service"], config["issuer"], Path(config["rootcertbundle"]))


@attrs.frozen
class RegistryOptions:
    """What to turn on. TLS needs both files; htpasswd is a bcrypt file (:func:`write_htpasswd`, or
    ``htpasswd -B``); ``token`` turns on token auth (exclusive with htpasswd)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    htpasswd: Path | None = None
    realm: str = "test-registry"
    token: TokenAuth | None = None
    #: merged into the generated configuration last (nested dicts are merged key by key)
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


@attrs.frozen
class Registry:
    """A running registry."""

    scheme: str
    host: str
    port: int
    root: Path  # storage root directory
    config: Path
    log: Path  # the process's stdout + stderr

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/v2/") -> str:
        return f"{self.scheme}://{self.authority}{path}"


def find_binary() -> str:
    found = shutil.which("docker-registry") or (
        "/usr/bin/docker-registry" if os.access("/usr/bin/docker-registry", os.X_OK) else None
    )
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def registry_config(root: Path, port: int, options: RegistryOptions) -> dict[str, Any]:
    """The registry's configuration (YAML is a superset of JSON, so it is written as JSON)."""
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": "test-secret-not-for-production"}
    if options.tls_cert is not None:
        if options.tls_key is None:
            raise ValueError("tls_cert needs tls_key")
        http["tls"] = {"certificate": str(options.tls_cert), "key": str(options.tls_key)}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": http,
    }
    if options.htpasswd is not None and options.token is not None:
        raise ValueError("htpasswd and token auth are exclusive")
    if options.htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": options.realm, "path": str(options.htpasswd)}}
    if options.token is not None:
        token = options.token
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.rootcertbundle),
            }
        }
    return _merge(config, options.extra)


BCRYPT_HINT = (
    "writing an htpasswd file needs bcrypt: the system's libcrypt (libxcrypt, Debian package libcrypt1) "
    "provides it; it was not found or does not support $2b$"
)


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A bcrypt (``$2b$``) hash from the system's libcrypt (libxcrypt), as ``htpasswd -B`` writes.

    No Python dependency: Python's ``crypt`` module is deprecated (removed in 3.13) and ``bcrypt`` is not installed;
    libxcrypt has done bcrypt for years. Cost 5 keeps tests fast (the registry checks any cost)."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        pytest.fail(BCRYPT_HINT, pytrace=False)
    library = ctypes.CDLL(name)
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    salt = "".join(alphabet[b % 64] for b in os.urandom(21)) + alphabet[os.urandom(1)[0] % 4 * 16]
    result = library.crypt(password.encode(), f"$2b${cost:02d}${salt}".encode())
    if not result or not result.startswith(b"$2b$"):
        pytest.fail(BCRYPT_HINT, pytrace=False)
    return result.decode()


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """Write an htpasswd file with a bcrypt entry per user."""
    path.write_text("".join(f"{user}:{bcrypt_hash(password)}\n" for user, password in users.items()))
    return path


def _environment() -> dict[str, str]:
    # REGISTRY_* variables override the configuration file; keep the machine's out of the test
    return {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}


async def _answers(port: int, tls: bool) -> bool:
    """One GET /v2/ with a bare h11 client: True if any HTTP response came back."""
    try:
        with trio.move_on_after(2):
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                if tls:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1", https_compatible=True)
                conn = h11.Connection(h11.CLIENT)
                request = h11.Request(method="GET", target="/v2/", headers=[("Host", f"127.0.0.1:{port}")])
                await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        return True
                    elif isinstance(event, h11.ConnectionClosed):
                        return False
            finally:
                await trio.aclose_forcefully(stream)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError):
        return False
    return False


async def _stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@asynccontextmanager
async def run_registry(workdir: Path, options: RegistryOptions | None = None) -> AsyncIterator[Registry]:
    """Start a registry under ``workdir``; stop it when the block ends."""
    options = options or RegistryOptions()
    binary = find_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    for attempt in range(3):  # another process may grab the free port before the registry binds it
        port = free_port()
        config_path = workdir / "config.yml"
        config_path.write_text(json.dumps(registry_config(root, port, options), indent=2))
        log = workdir / f"registry-{attempt}.log"
        with log.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_environment(),
            )
        try:
            deadline = trio.current_time() + READY_TIMEOUT
            while process.poll() is None and trio.current_time() < deadline:
                if await _answers(port, options.tls_cert is not None):
                    break
                await trio.sleep(0.05)  # polling interval, not synchronisation
            else:
                if process.returncode is not None and "address already in use" in _tail(log):
                    continue
                if process.returncode is not None:
                    pytest.fail(f"docker-registry exited with {process.returncode}:\n{_tail(log)}", pytrace=False)
                pytest.fail(f"docker-registry did not answer within {READY_TIMEOUT} s:\n{_tail(log)}", pytrace=False)
            yield Registry(options.scheme, "127.0.0.1", port, root, config_path, log)
            return
        finally:
            await _stop(process)
    pytest.fail("docker-registry could not bind a free port after 3 attempts", pytrace=False)


@pytest.fixture
async def docker_registry(tmp_path: Path) -> AsyncIterator[Registry]:
    """A plain-HTTP registry without auth, empty, on 127.0.0.1."""
    async with run_registry(tmp_path / "registry") as running:
        yield running
