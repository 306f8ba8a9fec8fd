"""One daemon, one blob cache, clients that do not trust each other (issue 14, part 5).

Two real docker-registry instances hold the same image: the session's (the victim's, behind the usual fault proxy
that counts its requests) and a second one, the attacker's, reached through fault proxies that trickle or alter
its bytes. A client pulling a blob from a registry it chose cannot slow, fail or poison another client's pull of
the same blob from another registry, nor make it fail by asking for a wrong size.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.faults.conftest import REPOSITORY, FaultImages
from tests.faults.proxy import Drip, FaultProxy, Flip, Stall, fault_proxy
from tests.http.registry import Registry
from tests.support.images import skopeo_copy
from tests.support.registry import registry_process

HANG_GUARD = 120.0
#: the victim's pull from its own registry takes well under a second; the attacker's trickle (a byte a second
#: after the first 64 KiB) would take weeks: joined to it, the victim would hit this guard
VICTIM_GUARD = 30.0
TRICKLE_FROM = 64 << 10
ATTACKER_REPOSITORY = "evil/faults"


@pytest.fixture(scope="module")
def second_registry(fault_images: FaultImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Another docker-registry holding the same image (so the same blobs) under another name."""
    with registry_process(tmp_path_factory.mktemp("second-registry")) as registry:
        skopeo_copy(
            f"docker://127.0.0.1:{fault_images.registry_port}/{REPOSITORY}:latest",
            f"docker://{registry.authority}/{ATTACKER_REPOSITORY}:latest",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        )
        yield registry


def blob_path(digest: str) -> str:
    return f"/blobs/{digest}$"


def final(cache, digest: str):
    return cache / "blobs" / "sha256" / digest.split(":")[1]


async def read_until(stream: trio.lowlevel.FdStream, have: bytearray, count: int) -> None:
    while len(have) < count:
        chunk = await stream.receive_some(1 << 20)
        assert chunk, f"the pipe ended after {len(have)} bytes"
        have += chunk


async def test_a_trickling_registry_does_not_hold_a_pull_of_the_same_blob_from_another(
    start_daemon, fault_images: FaultImages, fault: FaultProxy, second_registry: Registry, tmp_path
):
    """The attacker's GetBlob of X from its registry trickles; the victim's GetBlob of X from the genuine registry,
    started meanwhile, is not joined to it: it downloads X itself, at full speed, and gets it."""
    cache = tmp_path / "cache"
    daemon = await start_daemon("--blob-cache", str(cache), "--stall-timeout", "60")
    layer = fault_images.long
    with trio.fail_after(HANG_GUARD):
        async with fault_proxy(second_registry.port) as hostile:
            hostile.add_rule(Drip(at=TRICKLE_FROM, count=None, interval=1.0), path=blob_path(layer.digest))
            async with ImageProxy.connect(daemon.socket_path) as attacker:
                img = await attacker.open_image(f"docker://127.0.0.1:{hostile.port}/{ATTACKER_REPOSITORY}:latest")
                _, (fd,) = await attacker.call("GetBlob", [img, layer.digest, layer.size])
                async with trio.lowlevel.FdStream(fd) as stream:
                    await read_until(stream, bytearray(), TRICKLE_FROM)  # the attacker's download is under way
                    with trio.fail_after(VICTIM_GUARD):
                        async with ImageProxy.connect(daemon.socket_path) as victim:
                            mine = await victim.open_image(fault_images.ref(fault.port))
                            assert await victim.get_blob(mine, layer.digest, layer.size) == layer.data
                    (trickling,) = hostile.requests_for(blob_path(layer.digest))
                    assert not trickling.finished.is_set(), "the attacker's download is still trickling"
    assert [r.range for r in fault.requests_for(blob_path(layer.digest))] == [None], "the victim's own download"
    assert final(cache, layer.digest).read_bytes() == layer.data


async def test_a_hostile_registrys_wrong_bytes_do_not_fail_a_pull_from_another_registry(
    start_daemon, fault_images: FaultImages, fault: FaultProxy, second_registry: Registry, tmp_path
):
    """The attacker's registry sends X with a byte flipped; the attacker leaves mid-download, so its wrong bytes
    stay in the partial. The victim's GetBlob of X from the genuine registry does not resume them (nor truncate
    another source's partial): it gets X, downloaded into a file of its own, and X is stored."""
    cache = tmp_path / "cache"
    daemon = await start_daemon("--blob-cache", str(cache), "--stall-timeout", "60")
    layer = fault_images.long
    with trio.fail_after(HANG_GUARD):
        async with fault_proxy(second_registry.port) as slow, fault_proxy(slow.port) as hostile:
            hostile.add_rule(Flip(at=1000), path=blob_path(layer.digest))
            slow.add_rule(Drip(at=TRICKLE_FROM, count=None, interval=1.0), path=blob_path(layer.digest))
            async with ImageProxy.connect(daemon.socket_path) as attacker:
                img = await attacker.open_image(f"docker://127.0.0.1:{hostile.port}/{ATTACKER_REPOSITORY}:latest")
                _, (fd,) = await attacker.call("GetBlob", [img, layer.digest, layer.size])
                got = bytearray()
                async with trio.lowlevel.FdStream(fd) as stream:
                    await read_until(stream, got, TRICKLE_FROM)
            assert got[1000] != layer.data[1000], "the attacker's download wrote the flipped byte"
            # the attacker is gone: its download stops, leaving its partial
            (request,) = slow.requests_for(blob_path(layer.digest))
            await request.finished.wait()
        partial = final(cache, layer.digest).with_name(final(cache, layer.digest).name + ".partial")
        assert partial.stat().st_size >= TRICKLE_FROM
        async with ImageProxy.connect(daemon.socket_path) as victim:
            mine = await victim.open_image(fault_images.ref(fault.port))
            assert await victim.get_blob(mine, layer.digest, layer.size) == layer.data
    assert [r.range for r in fault.requests_for(blob_path(layer.digest))] == [None], "from zero, not resumed"
    assert final(cache, layer.digest).read_bytes() == layer.data
    assert partial.stat().st_size >= TRICKLE_FROM, "the other source's partial is left as it was"


async def test_a_client_asking_for_a_wrong_size_does_not_fail_another_following_the_same_download(
    start_daemon, fault_images: FaultImages, fault: FaultProxy, tmp_path
):
    """Both clients pull X from the same registry and share one download; the attacker asked for X's size + 1.
    That is the attacker's error only: the victim gets X, and X is stored."""
    cache = tmp_path / "cache"
    daemon = await start_daemon("--blob-cache", str(cache), "--stall-timeout", "2")
    layer = fault_images.long
    cut = 1 << 20
    fault.add_rule(Stall(at=cut), path=blob_path(layer.digest), nth=1)  # resumed after the 2 s stall timeout
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.connect(daemon.socket_path) as attacker, ImageProxy.connect(daemon.socket_path) as victim:
            theirs = await attacker.open_image(fault_images.ref(fault.port))
            mine = await victim.open_image(fault_images.ref(fault.port))
            attack_reply, (attack_fd,) = await attacker.call("GetBlob", [theirs, layer.digest, layer.size + 1])
            await fault.wait_until(lambda: bool(fault.requests_for(blob_path(layer.digest))))
            await fault.requests_for(blob_path(layer.digest))[0].fault_fired.wait()  # stalled at `cut`
            victim_reply, (victim_fd,) = await victim.call("GetBlob", [mine, layer.digest, layer.size])
            attacker_got, victim_got = bytearray(), bytearray()
            attacker_error: list[ProxyError] = []

            async def drain(fd: int, into: bytearray) -> None:
                async with trio.lowlevel.FdStream(fd) as stream:
                    while chunk := await stream.receive_some(1 << 20):
                        into += chunk

            async def attacker_finish() -> None:
                try:
                    await attacker.finish_pipe(attack_reply.pipeid)
                except ProxyError as e:
                    attacker_error.append(e)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, attack_fd, attacker_got)
                nursery.start_soon(drain, victim_fd, victim_got)
                nursery.start_soon(attacker_finish)
                await victim.finish_pipe(victim_reply.pipeid)
    assert bytes(victim_got) == layer.data
    assert [str(e) for e in attacker_error] == [
        f"FinishPipe: expected {layer.size + 1} bytes in blob, got {layer.size}"
    ]
    assert [r.range for r in fault.requests_for(blob_path(layer.digest))] == [None, f"bytes={cut}-"], "one download"
    assert final(cache, layer.digest).read_bytes() == layer.data
