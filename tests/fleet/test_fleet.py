"""Issue 20: a fleet of nodes behind a pull-through cache, each running ``image-proxy daemon`` whose registries.conf
names the cache host as the upstream's mirror. Every node pulls the same image at once with the client bindings;
what the upstream served is counted from its access log, what the cache host answered from its front's.

Hosts are network namespaces (tests/fleet/netns.py); what runs on them is in tests/fleet/hosts.py.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence

import pytest
import trio

from tests.faults.proxy import Stall
from tests.fleet.clients import NodePull, failures, pull_everywhere
from tests.fleet.conftest import Fleet
from tests.fleet.faults import fault_proxy_on
from tests.fleet.hosts import (
    REGISTRY_PORT,
    CacheHost,
    Node,
    nodes_running,
    registries_conf,
    start_cache,
    start_registry,
)

#: the nodes' deadlines (daemon flags): short, so that a fault costs seconds
STALL_TIMEOUT = 2.0
CONNECT_TIMEOUT = 3.0
DEADLINES = ("--stall-timeout", str(STALL_TIMEOUT), "--connect-timeout", str(CONNECT_TIMEOUT))


@contextlib.contextmanager
def cache_host(fleet: Fleet, name: str, **options: object) -> Iterator[CacheHost]:
    cache = start_cache(fleet.cache_host, fleet.workdir / name / "cache", fleet.upstream, fleet.ca, **options)
    try:
        yield cache
    finally:
        cache.stop()


@contextlib.contextmanager
def fleet_nodes(
    fleet: Fleet, name: str, mirrors: Sequence[tuple[str, bool]], tls_mirrors: Sequence[str], **options: object
) -> Iterator[list[Node]]:
    conf = registries_conf(fleet.upstream.authority, mirrors)
    with nodes_running(fleet.node_hosts, fleet.workdir / name / "nodes", conf, fleet.ca, tls_mirrors, **options) as n:
        yield n


def assert_all_verified(fleet: Fleet, states: Sequence[NodePull]) -> None:
    """Every node pulled the image: the manifest the upstream holds, every blob of it (sizes and digests checked
    by the client bindings as the bytes came)."""
    assert not failures(states), failures(states)
    for state in states:
        assert state.image is not None
        assert state.image.manifest_digest == fleet.image.manifest_digest, state.node.host.role
        pulled = {blob.digest: blob.size for blob in state.image.blobs}
        assert pulled == fleet.blobs, state.node.host.role
        assert state.image.fetched_bytes == fleet.image_bytes, state.node.host.role


def per_digest(entries: Sequence) -> collections.Counter[str]:
    return collections.Counter(e.blob for e in entries)


# ----------------------------------------------------------------------------------------------------------- once


@pytest.mark.parametrize("shape", ["cache", "p2p+cache"])
async def test_upstream_serves_each_blob_once_for_the_whole_fleet(fleet: Fleet, shape: str) -> None:
    """Six nodes pull at once through the cache host (shape ``cache``), or through a P2P-shaped first mirror that
    has nothing yet and answers 404, then the cache host (``p2p+cache``, the Spegel/Kraken layout: two mirror
    entries). The upstream serves each blob once for the whole fleet, to the cache host; no node reaches it."""
    name = f"once-{shape}"
    mirrors = [(fleet.cache_host.address, False)]
    peer = None
    if shape == "p2p+cache":
        peer = start_registry(fleet.peer_host, fleet.workdir / name / "peer", "0.0.0.0")  # empty: no peer has it
        mirrors.insert(0, (f"{fleet.peer_host.address}:{REGISTRY_PORT}", True))
    try:
        with cache_host(fleet, name) as cache, fleet_nodes(fleet, name, mirrors, [cache.authority]) as nodes:
            mark = fleet.upstream.access.mark()
            states = await pull_everywhere(nodes, fleet.upstream.reference())
            assert_all_verified(fleet, states)

            upstream = fleet.upstream.access.entries(mark)
            blob_gets = [e for e in upstream if e.method == "GET" and e.blob is not None]
            assert per_digest(blob_gets) == dict.fromkeys(fleet.blobs, 1), "each blob served once, for the fleet"
            assert {e.client for e in blob_gets} == {fleet.cache_host.address}, "only the cache host fetched"
            node_addresses = {h.address for h in fleet.node_hosts}
            assert not [e for e in upstream if e.client in node_addresses], "no node went to the upstream"
            assert sum(e.bytes for e in blob_gets) == fleet.image_bytes

            front = cache.front.blob_gets()
            for node in nodes:
                mine = [e for e in front if e.client == node.address]
                assert per_digest(mine) == dict.fromkeys(fleet.blobs, 1), node.host.role
                assert {e.status for e in mine} == {200}, node.host.role
            if peer is not None:
                asked = [e for e in peer.log.read_text().splitlines() if "/blobs/sha256:" in e and '"GET ' in e]
                assert len(asked) == len(fleet.blobs) * len(nodes), "every node asked the peer first, once a blob"
                assert all('" 404 ' in line for line in asked)
    finally:
        if peer is not None:
            peer.stop()


# ----------------------------------------------------------------------------------------------------------- killed


async def test_cache_host_killed_mid_pull_nodes_finish_from_upstream(fleet: Fleet) -> None:
    """The cache host (nginx and its registry) is killed while every node is inside the last layer (the front sends
    4 MiB/s a connection, so the nodes move together): each node resumes that blob from the upstream at the offset
    it had, within its deadlines, and finishes. The upstream serves at most 2x the image: the cache's fill plus, per
    node, no more than what the node still lacked when the cache died."""
    name = "killed"
    image = fleet.image_bytes
    threshold = image * 7 // 8  # inside the last 8 MiB layer for every node
    with (
        cache_host(fleet, name, rate="4m") as cache,
        fleet_nodes(fleet, name, [(fleet.cache_host.address, False)], [cache.authority], flags=DEADLINES) as nodes,
    ):
        mark = fleet.upstream.access.mark()
        had_at_kill: dict[str, int] = {}
        killed_at: list[float] = []

        async def kill_when_all_are_far(states: list[NodePull]) -> None:
            with trio.fail_after(60):
                while not all(s.received >= threshold for s in states):
                    assert not any(s.finished for s in states), "a node finished before the kill: not mid-pull"
                    await trio.sleep(0.02)  # polling the nodes' progress, not a synchronisation
            await trio.to_thread.run_sync(cache.kill)
            killed_at.append(trio.current_time())
            had_at_kill.update({s.node.address: s.received for s in states})

        states = await pull_everywhere(nodes, fleet.upstream.reference(), concurrency=1, during=kill_when_all_are_far)
        assert_all_verified(fleet, states)
        assert killed_at, "the cache host was never killed"
        for state in states:
            assert state.received > had_at_kill[state.node.address] or state.received == image
            assert had_at_kill[state.node.address] < image, f"{state.node.host.role} had finished before the kill"
            # the deadlines: connects refused at once, the cut bodies end at once; a stall would cost STALL_TIMEOUT
            after = state.finished - killed_at[0] if state.finished is not None else None
            assert after is not None and after <= STALL_TIMEOUT + CONNECT_TIMEOUT + 5, (state.node.host.role, after)

        upstream = fleet.upstream.access.blob_gets(mark)
        total = sum(e.bytes for e in upstream)
        assert total <= 2 * image, f"upstream served {total} bytes, more than twice the image ({image})"
        for node in nodes:
            mine = sum(e.bytes for e in upstream if e.client == node.address)
            lacked = image - had_at_kill[node.address]
            assert 0 < mine <= lacked, f"{node.host.role} fetched {mine} bytes upstream, lacking {lacked} at the kill"


# ----------------------------------------------------------------------------------------------------------- 404/503


async def test_kraken_404_and_503_from_the_cache_fall_back_and_are_not_remembered(fleet: Fleet) -> None:
    """With the cache host's link to the upstream cut, it answers 404 for every blob (Kraken's "backend
    unavailable", kraken#631); then, link back, it answers 503 (draining). Both times every node falls back to the
    upstream per blob and finishes. Then the same daemons pull again and everything comes through the cache: no
    node kept a negative answer (the daemons have no blob cache here, so every pull asks the network)."""
    name = "negative"
    cache_address = fleet.cache_host.address
    node_addresses = {h.address for h in fleet.node_hosts}
    with (
        cache_host(fleet, name) as cache,
        fleet_nodes(
            fleet, name, [(cache_address, False)], [cache.authority], flags=DEADLINES, blob_cache=False
        ) as nodes,
    ):
        # 1. the Kraken case: the cache cannot reach its upstream and says 404
        fleet.net.cut(fleet.cache_host, fleet.upstream.host)
        try:
            up_mark, front_mark = fleet.upstream.access.mark(), cache.front.mark()
            states = await pull_everywhere(nodes, fleet.upstream.reference())
            assert_all_verified(fleet, states)
            front = cache.front.blob_gets(front_mark)
            assert front and {e.status for e in front} == {404}, collections.Counter(e.status for e in front)
            direct = [e for e in fleet.upstream.access.blob_gets(up_mark) if e.client in node_addresses]
            for node in nodes:
                assert per_digest(e for e in direct if e.client == node.address) == dict.fromkeys(fleet.blobs, 1)
        finally:
            fleet.net.restore(fleet.cache_host, fleet.upstream.host)

        # 2. the link is back, but the cache host is draining: 503 for a while
        cache.set_maintenance(True)
        up_mark, front_mark = fleet.upstream.access.mark(), cache.front.mark()
        states = await pull_everywhere(nodes, fleet.upstream.reference())
        cache.set_maintenance(False)
        assert_all_verified(fleet, states)
        assert {e.status for e in cache.front.entries(front_mark)} == {503}
        direct = [e for e in fleet.upstream.access.blob_gets(up_mark) if e.client in node_addresses]
        for node in nodes:
            assert per_digest(e for e in direct if e.client == node.address) == dict.fromkeys(fleet.blobs, 1)

        # 3. the cache host is healthy again: the next pull of every node goes through it, nothing to the upstream
        up_mark, front_mark = fleet.upstream.access.mark(), cache.front.mark()
        states = await pull_everywhere(nodes, fleet.upstream.reference())
        assert_all_verified(fleet, states)
        front = cache.front.blob_gets(front_mark)
        for node in nodes:
            mine = [e for e in front if e.client == node.address]
            assert per_digest(mine) == dict.fromkeys(fleet.blobs, 1), node.host.role
            assert {e.status for e in mine} == {200}, node.host.role
        assert not [e for e in fleet.upstream.access.entries(up_mark) if e.client in node_addresses]


# ----------------------------------------------------------------------------------------------------------- stall


async def test_a_stalling_cache_costs_each_node_at_most_its_stall_deadline_per_blob(fleet: Fleet) -> None:
    """The cache host stalls every layer after 1 MiB and holds the connection open (a fault proxy between its nginx
    and its registry). Each node waits its stall deadline once per layer, then gets the rest of that layer from the
    upstream: no layer costs more than the deadline plus its transfer, and the pull never fails."""
    name = "stall"
    at = 1 << 20
    with fault_proxy_on(fleet.cache_host, REGISTRY_PORT) as fault:
        fault.add_rule(Stall(at=at), path=r"/blobs/sha256:")
        with (
            cache_host(fleet, name, backend_port=fault.port) as cache,
            fleet_nodes(fleet, name, [(fleet.cache_host.address, False)], [cache.authority], flags=DEADLINES) as nodes,
        ):
            mark = fleet.upstream.access.mark()
            states = await pull_everywhere(nodes, fleet.upstream.reference(), concurrency=1)
            assert_all_verified(fleet, states)
            stalled = [r for r in fault.requests if r.outcome == "stalled"]
            assert len(stalled) == len(nodes) * len(fleet.image.layers), "every layer stalled once on every node"
            transfer = 3.0  # the rest of an 8 MiB layer from the upstream, and the next request, on a busy machine
            for state in states:
                for layer in fleet.image.layers:
                    took = state.blob_seconds(layer.digest)
                    assert STALL_TIMEOUT <= took <= STALL_TIMEOUT + transfer, (state.node.host.role, layer.digest, took)
            direct = fleet.upstream.access.blob_gets(mark)
            for node in nodes:
                resumed = [e for e in direct if e.client == node.address]
                assert per_digest(resumed) == {layer.digest: 1 for layer in fleet.image.layers}, node.host.role
                assert sum(e.bytes for e in resumed) <= fleet.image_bytes - len(fleet.image.layers) * at + (1 << 20)
