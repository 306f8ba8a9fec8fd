"""A real registry for a whole test session, with the standard images pushed by the real skopeo.

pytest-trio fixtures live in one test's trio run, so the session-wide registry is started here with
plain subprocess calls; tests/http/registry.py (per test, async) shares its configuration builder.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from tests.http.registry import Registry, RegistryOptions, find_binary, free_port, registry_config
from tests.support.images import BuiltImage, BuiltIndex, StandardImages, skopeo_copy

READY_TIMEOUT = 30.0


def answers_v2(port: int, tls: bool = False, statuses: tuple[int, ...] = (200, 401)) -> bool:
    """Whether a server on 127.0.0.1:``port`` answers ``GET /v2/`` with one of ``statuses`` (a readiness probe)."""
    if tls:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=2, context=ssl._create_unverified_context()
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status in statuses
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def registry_process(workdir: Path, options: RegistryOptions | None = None) -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1 (plain HTTP, or TLS with ``options``) until the block ends."""
    options = options or RegistryOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(json.dumps(registry_config(root, port, options)))
    log = workdir / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen([find_binary(), "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not answers_v2(port, options.tls_cert is not None):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)  # polling interval, not synchronisation
        yield Registry(options.scheme, "127.0.0.1", port, root, config, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@attrs.frozen
class PushedImages:
    """The standard images in a registry: ``ref(name)`` is a docker:// reference."""

    registry: Registry
    images: StandardImages

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"docker://{self.registry.authority}/{repository}:{tag}"

    @property
    def single(self) -> BuiltImage:
        return self.images.single

    @property
    def multi(self) -> BuiltIndex:
        return self.images.multi

    @property
    def v2s2(self) -> BuiltImage:
        return self.images.v2s2


def push_standard_images(registry: Registry, images: StandardImages) -> PushedImages:
    """single -> test/single:latest, multi (all instances) -> test/multi:latest, v2s2 -> test/v2s2:latest,
    big -> test/big:latest; pushed by skopeo without changing their manifests."""
    layout = images.layout.path
    dest = f"docker://{registry.authority}"
    for tag, repository, extra in (
        ("latest", "test/single", ()),
        ("multi", "test/multi", ("--all",)),
        ("v2s2", "test/v2s2", ()),
        ("big", "test/big", ()),
    ):
        skopeo_copy(f"oci:{layout}:{tag}", f"{dest}/{repository}:latest", "--dest-tls-verify=false", *extra)
    return PushedImages(registry, images)
