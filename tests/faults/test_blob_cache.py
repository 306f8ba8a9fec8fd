"""The blob cache (--blob-cache) against the real registry behind the fault proxy, which counts what was
downloaded: blobs are fetched once, partial downloads resume, bad files are never served. Every case runs over
plain HTTP and over TLS (see conftest.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from proxy.cache.files import SOURCE_XATTR, STAMP_XATTR, source_tag, verification_stamp
from tests.faults.conftest import REPOSITORY, FaultImages, Layer
from tests.faults.proxy import Answer, FaultProxy, Stall
from tests.faults.transport import assert_transport_used

HANG_GUARD = 60.0


def cache_args(cache: Path, *extra: str) -> list[str]:
    return ["--tls-verify=false", "--stall-timeout", "1", "--blob-cache", str(cache), *extra]


def final(cache: Path, layer: Layer) -> Path:
    return cache / "blobs" / "sha256" / layer.digest.split(":")[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def blob_gets(fault: FaultProxy, layer: Layer) -> list:
    return fault.requests_for(f"/blobs/{layer.digest}$")


async def pull(fault_images: FaultImages, fault: FaultProxy, cache: Path, layer: Layer, *extra: str) -> None:
    """One daemon process: the blob's bytes, and the daemon spoke what the fault proxy serves (plain or TLS)."""
    async with ImageProxy.spawn(extra_args=cache_args(cache, *extra)) as proxy:
        img = await proxy.open_image(fault_images.ref(fault.port))
        assert await proxy.get_blob(img, layer.digest, layer.size) == layer.data
    assert_transport_used(fault)


async def test_a_cached_blob_is_served_without_the_network(fault_images, fault, tmp_path):
    layer = fault_images.seed
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
        assert final(tmp_path, layer).read_bytes() == layer.data
        assert not list(final(tmp_path, layer).parent.glob("*.partial"))
        await pull(fault_images, fault, tmp_path, layer)  # a second process
    assert len(blob_gets(fault, layer)) == 1


async def test_ten_concurrent_readers_share_one_download(fault_images, fault, tmp_path):
    layer = fault_images.long
    results: list[bytes] = []
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(tmp_path)) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))

            async def read_blob() -> None:
                results.append(await proxy.get_blob(img, layer.digest, layer.size))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(read_blob)
    assert len(results) == 10 and all(r == layer.data for r in results)
    assert len(blob_gets(fault, layer)) == 1, "one upstream download"
    assert_transport_used(fault)


async def test_an_interrupted_download_resumes_from_the_partial_file(fault_images, fault, tmp_path):
    """The first pull stalls for good at 40 % and gives up; the partial stays; the next pull asks only for
    the rest, so no byte is downloaded twice."""
    layer = fault_images.long
    cut = layer.size * 2 // 5
    rule = fault.add_rule(Stall(at=cut), path=f"/blobs/{layer.digest}$")
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=cache_args(tmp_path, "--max-resumes", "0")) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))
            with pytest.raises(ProxyError):
                await proxy.get_blob(img, layer.digest, layer.size)
        partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
        assert partial.stat().st_size == cut and not final(tmp_path, layer).exists()
        fault.remove_rule(rule)
        await pull(fault_images, fault, tmp_path, layer)
    gets = blob_gets(fault, layer)
    assert [g.range for g in gets] == [None, f"bytes={cut}-"]
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()


def left_partial(fault: FaultProxy, tmp_path: Path, layer: Layer, data: bytes) -> Path:
    """The partial a download of ``layer`` from the fault proxy's repository left with ``data`` (its source tag
    included: another source's partial is never resumed)."""
    partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    os.setxattr(partial, SOURCE_XATTR, source_tag(f"127.0.0.1:{fault.port}/{REPOSITORY}"))
    return partial


async def test_a_corrupt_partial_is_dropped_and_the_blob_fetched_again_in_the_same_request(
    fault_images, fault, tmp_path
):
    """Resumed bytes are served only once the whole blob matched; when it does not, the partial is dropped and
    the same GetBlob starts again from zero (the next client is never the one to fail)."""
    layer = fault_images.small
    partial = left_partial(fault, tmp_path, layer, b"\0" * 1000)  # not the blob's first 1000 bytes
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)  # asserts the bytes served are the blob's
    assert [g.range for g in blob_gets(fault, layer)] == ["bytes=1000-", None]
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
async def test_a_damaged_cached_blob_is_never_served(fault_images, fault, tmp_path, damage):
    layer = fault_images.small
    path = final(tmp_path, layer)
    path.parent.mkdir(parents=True)
    data = bytearray(layer.data)
    if damage == "truncated":
        del data[-100:]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)  # asserts the bytes served are the blob's
    assert len(blob_gets(fault, layer)) == 1, "the damaged file was detected and the blob fetched again"
    assert path.read_bytes() == layer.data


async def test_a_complete_partial_left_by_a_kill_before_the_rename_is_committed_without_the_network(
    fault_images, fault, tmp_path
):
    layer = fault_images.small
    partial = left_partial(fault, tmp_path, layer, layer.data)
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
    assert blob_gets(fault, layer) == [], "no Range request past the end (it would get a 416)"
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()


async def test_a_complete_partial_with_wrong_content_is_fetched_again(fault_images, fault, tmp_path):
    layer = fault_images.small
    partial = left_partial(fault, tmp_path, layer, b"x" * layer.size)
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
    assert [g.range for g in blob_gets(fault, layer)] == [None]
    assert final(tmp_path, layer).read_bytes() == layer.data and not partial.exists()


async def test_a_wrong_size_fails_for_its_asker_and_never_removes_the_cached_blob(fault_images, fault, tmp_path):
    """A GetBlob with the blob's size + 1 (or - 1) is that client's error; the verified blob stays, and is
    served to the next client while the registry cannot serve it."""
    layer = fault_images.small
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)
        fault.add_rule(Answer(404), path=f"/blobs/{layer.digest}$")  # the registry has lost it meanwhile
        async with ImageProxy.spawn(extra_args=cache_args(tmp_path)) as proxy:
            img = await proxy.open_image(fault_images.ref(fault.port))
            for wrong in (layer.size + 1, layer.size - 1):
                with pytest.raises(ProxyError, match=f"expected {wrong} bytes in blob, got {layer.size}"):
                    await proxy.get_blob(img, layer.digest, wrong)
                assert final(tmp_path, layer).read_bytes() == layer.data
        await pull(fault_images, fault, tmp_path, layer)  # another process, another client
    assert [g.status for g in blob_gets(fault, layer)] == [200], "only the first pull asked the registry"


@pytest.mark.parametrize("untrusted", ["owned by another user", "group-writable"])
async def test_a_forged_stamp_is_not_believed_on_a_file_others_can_write(fault_images, fault, tmp_path, untrusted):
    """Wrong bytes under the digest name with a stamp claiming they were verified: the stamp proves nothing on
    a file the proxy's user does not alone control; it is re-hashed, removed, and the blob fetched again."""
    if os.geteuid() != 0:
        pytest.fail("the test gives a file to another user: it needs root (CI runs as root)")
    layer = fault_images.small
    path = final(tmp_path, layer)
    path.parent.mkdir(parents=True)
    wrong = bytearray(layer.data)
    wrong[len(wrong) // 2] ^= 0x01
    path.write_bytes(bytes(wrong))
    if untrusted == "group-writable":
        path.chmod(0o664)
    else:
        os.chown(path, 4242, 4242)
    os.setxattr(path, STAMP_XATTR, verification_stamp(path.stat()))
    with trio.fail_after(HANG_GUARD):
        await pull(fault_images, fault, tmp_path, layer)  # asserts the bytes served are the blob's
    assert len(blob_gets(fault, layer)) == 1
    assert path.read_bytes() == layer.data and path.stat().st_uid == os.geteuid()


@pytest.mark.parametrize("link", ["blobs/sha256", "partial"])
async def test_a_symlink_in_the_cache_is_refused_and_nothing_outside_it_is_touched(fault_images, fault, tmp_path, link):
    """A symlinked blobs/sha256 (to a directory outside) or partial (to a file outside) is never followed: the
    blob is streamed uncached, nothing outside DIR is created, written or truncated."""
    layer = fault_images.small
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious"
    precious.write_bytes(b"someone else's file")
    (cache / "blobs").mkdir(parents=True)
    if link == "blobs/sha256":
        (cache / "blobs" / "sha256").symlink_to(outside, target_is_directory=True)
    else:
        final(cache, layer).parent.mkdir()
        final(cache, layer).with_name(final(cache, layer).name + ".partial").symlink_to(precious)
    with trio.fail_after(HANG_GUARD):
        for _ in range(2):
            await pull(fault_images, fault, cache, layer)  # asserts the bytes served are the blob's
    assert len(blob_gets(fault, layer)) == 2, "streamed uncached each time"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert precious.read_bytes() == b"someone else's file"


async def test_what_the_cache_creates_is_private(fault_images, fault, tmp_path):
    """Directories 0700 and files 0600 whatever the umask, as the partial grows and once stored."""
    layer = fault_images.long
    cache = tmp_path / "new" / "cache"
    partial = final(cache, layer).with_name(final(cache, layer).name + ".partial")
    cut = layer.size // 2
    fault.add_rule(Stall(at=cut), path=f"/blobs/{layer.digest}$", nth=1)
    old_umask = os.umask(0o022)
    try:
        with trio.fail_after(HANG_GUARD):
            async with ImageProxy.spawn(extra_args=cache_args(cache, "--max-resumes", "0")) as proxy:
                img = await proxy.open_image(fault_images.ref(fault.port))
                with pytest.raises(ProxyError):
                    await proxy.get_blob(img, layer.digest, layer.size)
            assert mode(partial) == 0o600 and partial.stat().st_size == cut
            await pull(fault_images, fault, cache, layer)
    finally:
        os.umask(old_umask)
    assert [mode(d) for d in (tmp_path / "new", cache, cache / "blobs", cache / "blobs" / "sha256")] == [0o700] * 4
    assert mode(final(cache, layer)) == 0o600


#: another process: lock the partial named by argv[1] as a download does, say so, and hold it until stdin closes
LOCKER = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


#: a pull of the 4.5 MiB blob takes well under a second; one that waits for the other process's lock never ends
LOCKED_PULL_BOUND = 15.0


def anonymous_files_work(directory: Path) -> bool:
    """Whether ``O_TMPFILE`` files can be made in ``directory`` (the filesystem supports them)."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


async def test_a_partial_locked_by_another_process_is_neither_written_nor_resumed(fault_images, fault, tmp_path):
    """README: "When two registries' downloads of one blob run at once (or another process holds the partial), the
    second writes an anonymous file (O_TMPFILE; where that is impossible it streams uncached)". The other
    process's partial holds the blob's true first 1000 bytes: it is still not resumed from (its owner is still
    writing it), nor written to; the blob is fetched whole, and stored if an anonymous file could be made here."""
    layer = fault_images.long
    partial = final(tmp_path, layer).with_name(final(tmp_path, layer).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(layer.data[:1000])
    os.chmod(partial, 0o600)
    with trio.fail_after(HANG_GUARD):
        locker = await trio.lowlevel.open_process(
            [sys.executable, "-c", LOCKER, str(partial)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert locker.stdout is not None and locker.stdin is not None
            said = b""
            while not said.endswith(b"\n"):
                chunk = await locker.stdout.receive_some(64)
                assert chunk, f"the locking process ended without locking: {said!r}"
                said += chunk
            assert said == b"locked\n"
            with trio.move_on_after(LOCKED_PULL_BOUND) as bound:
                await pull(fault_images, fault, tmp_path, layer)  # asserts the bytes the client got
            assert not bound.cancelled_caught, f"no blob in {LOCKED_PULL_BOUND} s: waiting for the other's lock?"
            assert partial.is_file(), "the other process's partial was taken over"
            assert partial.read_bytes() == layer.data[:1000], "the other process's partial was written to"
            assert locker.returncode is None, "the other process still holds its lock"
        finally:
            if locker.stdin is not None:
                await locker.stdin.aclose()
            with trio.CancelScope(shield=True):
                await locker.wait()
    assert locker.returncode == 0
    assert [g.range for g in blob_gets(fault, layer)] == [None], "fetched whole, never resumed from a locked partial"
    if anonymous_files_work(partial.parent):
        assert final(tmp_path, layer).read_bytes() == layer.data, "the anonymous file, verified, is stored"
        assert mode(final(tmp_path, layer)) == 0o600
    else:
        assert not final(tmp_path, layer).exists(), "no anonymous file here: streamed uncached"
