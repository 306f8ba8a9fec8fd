"""The fleet (issue 20): hosts as network namespaces -- an upstream registry holding the image, a cache host, a
P2P-shaped peer and :data:`NODES` nodes -- made once for the module; each test starts its own cache host and
daemons. See tests/fleet/netns.py and tests/fleet/hosts.py.

Nothing here skips: a machine where the namespaces or the programs cannot be had fails the tests, saying what is
missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trustme

from tests.fleet.hosts import HostFailed, Upstream, build_image, start_upstream
from tests.fleet.netns import FleetUnavailable, Host, Network, network
from tests.support.images import BuiltImage

#: how many nodes pull at once
NODES = 6
#: the image: four layers of 8 MiB (incompressible) and a config: 32 MiB
LAYER_SIZES = (8 << 20,) * 4


@attrs.frozen
class Fleet:
    net: Network
    ca: trustme.CA
    image: BuiltImage
    upstream: Upstream
    workdir: Path

    @property
    def cache_host(self) -> Host:
        return self.net["cache"]

    @property
    def peer_host(self) -> Host:
        return self.net["peer"]

    @property
    def node_hosts(self) -> list[Host]:
        return [self.net[f"node-{i}"] for i in range(NODES)]

    @property
    def image_bytes(self) -> int:
        return self.image.config_size + sum(layer.size for layer in self.image.layers)

    @property
    def blobs(self) -> dict[str, int]:
        """digest -> size of every blob of the image."""
        return {self.image.config_digest: self.image.config_size} | {
            layer.digest: layer.size for layer in self.image.layers
        }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    roles = ["upstream", "cache", "peer", *(f"node-{i}" for i in range(NODES))]
    try:
        image = build_image(workdir / "layout", LAYER_SIZES)
        with network(roles) as net:
            upstream = start_upstream(net["upstream"], workdir / "upstream", image, "fleet")
            try:
                yield Fleet(net, trustme.CA(), image, upstream, workdir)
            finally:
                upstream.process.stop()
    except (FleetUnavailable, HostFailed) as e:
        pytest.fail(f"the fleet cannot be set up here: {e}", pytrace=False)
