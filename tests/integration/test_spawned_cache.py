"""A spawned proxy honours the settings file's [cache] (issue 22, part 1): with ``enabled = true`` every proxy an
update agent spawns shares one verified blob cache (the second pull of an image asks the registry for no blob);
without it there is no cache, as before; a cache the proxy's user cannot write is skipped with one log line and
the pull still succeeds. The registry is the real one, behind the fault proxy (no faults: it counts requests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.client.pull import pull
from tests.faults.conftest import FaultImages, fault, fault_images  # noqa: F401  (fixtures)
from tests.faults.proxy import FaultProxy
from tests.support.sinks import discard_all

SERVER = [sys.executable, "-m", "proxy", "experimental-image-proxy", "--tls-verify=false", "--insecure-policy"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700), for a config file another user reads."""
    path = Path(tempfile.mkdtemp(prefix="image-proxy-spawned-cache-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


async def pull_once(argv: list[str], reference: str) -> str:
    """Spawn ``argv`` on a socketpair, pull ``reference`` with the bindings (every blob verified, then dropped);
    the proxy's stderr."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(argv, stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        async with ImageProxy.connect(ours) as proxy:
            await pull(proxy, reference, discard_all)
        _, stderr = await trio.to_thread.run_sync(process.communicate, None, 30)
        assert process.returncode == 0, stderr
        return stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def blob_gets(fault: FaultProxy, images: FaultImages) -> int:  # noqa: F811
    layers = (images.seed, images.long, images.small)
    return sum(len(fault.requests_for(f"/blobs/{layer.digest}")) for layer in layers)


async def test_enabled_in_the_settings_file_every_spawned_proxy_shares_one_cache(
    fault: FaultProxy,  # noqa: F811
    fault_images: FaultImages,  # noqa: F811
    shared_dir: Path,
) -> None:
    cache = shared_dir / "cache"
    config = shared_dir / "config.toml"
    config.write_text(f'[cache]\nenabled = true\ndir = "{cache}"\n')
    ref = fault_images.ref(fault.port)
    await pull_once([*SERVER, "--config", str(config)], ref)
    assert blob_gets(fault, fault_images) == 3
    assert (cache / "blobs" / "sha256" / fault_images.long.digest.split(":", 1)[1]).is_file()
    await pull_once([*SERVER, "--config", str(config)], ref)
    assert blob_gets(fault, fault_images) == 3, "the second proxy asked the registry for a blob the cache had"


async def test_without_it_there_is_no_cache(
    fault: FaultProxy,  # noqa: F811
    fault_images: FaultImages,  # noqa: F811
    shared_dir: Path,
) -> None:
    config = shared_dir / "config.toml"
    config.write_text(f'[cache]\ndir = "{shared_dir / "cache"}"\n')  # a directory, but not enabled for spawned proxies
    ref = fault_images.ref(fault.port)
    await pull_once([*SERVER, "--config", str(config)], ref)
    await pull_once([*SERVER, "--config", str(config)], ref)
    assert blob_gets(fault, fault_images) == 6
    assert not (shared_dir / "cache").exists()


async def test_a_cache_the_proxys_user_cannot_write_is_skipped_with_one_line(
    fault: FaultProxy,  # noqa: F811
    fault_images: FaultImages,  # noqa: F811
    shared_dir: Path,
) -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run the proxy as another user", pytrace=False)
    cache = shared_dir / "cache"
    (cache / "blobs").mkdir(parents=True, mode=0o700)  # root's, private: what the daemon makes
    config = shared_dir / "config.toml"
    config.write_text(f'[cache]\nenabled = true\ndir = "{cache}"\n')
    config.chmod(0o644)
    # as rpm-ostree runs its proxy: another user (HOME still root's, which that user cannot search) and --no-creds
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = [*nobody, *SERVER, "--no-creds", "--config", str(config)]
    stderr = await pull_once(argv, fault_images.ref(fault.port))
    warnings = [line for line in stderr.splitlines() if "blob cache" in line]
    assert len(warnings) == 1 and f"blob cache {cache}" in warnings[0], stderr
    assert "no cache" in warnings[0]
    assert blob_gets(fault, fault_images) == 3  # pulled all the same
    assert list((cache / "blobs").iterdir()) == []
