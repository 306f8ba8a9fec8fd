"""A mirror whose blob body stalls: the resume asks the primary first (the fleet's stalling cache host, on loopback
with one daemon, so it runs without namespaces). Before, the resume went back to the mirror that had just stalled,
stalled again until the resume budget ran out, and the blob failed."""

from __future__ import annotations

import hashlib
import time

from protocol.client import ImageProxy
from tests.faults.proxy import Stall, fault_proxy

STALL = 2.0


async def test_a_blob_stalled_by_a_mirror_resumes_from_the_primary(registry_images, tmp_path) -> None:
    primary = registry_images.registry
    layer = registry_images.single.layers[0]
    at = layer.size // 2
    async with fault_proxy(primary.port) as mirror:
        mirror.add_rule(Stall(at=at), path=layer.digest)  # stuck at `at` for good, resumed requests too
        conf = tmp_path / "registries.conf"
        conf.write_text(
            f'[[registry]]\nprefix = "{primary.authority}"\nlocation = "{primary.authority}"\ninsecure = true\n\n'
            f'[[registry.mirror]]\nlocation = "127.0.0.1:{mirror.port}"\ninsecure = true\n'
        )
        flags = ["--registries-conf", str(conf), "--stall-timeout", str(STALL)]
        async with ImageProxy.spawn(extra_args=flags) as proxy:
            img = await proxy.open_image(registry_images.ref("test/single"))
            started = time.monotonic()
            data = await proxy.get_blob(img, layer.digest, layer.size)
            took = time.monotonic() - started
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    asked = mirror.requests_for(layer.digest)
    assert len(asked) == 1 and asked[0].outcome == "stalled", [(r.range, r.outcome) for r in asked]
    assert STALL <= took < 2 * STALL, f"one stall deadline, not one per resume: {took:.1f} s"
    resumed = [line for line in primary.log.read_text().splitlines() if layer.digest in line and '"GET ' in line]
    assert resumed, "the rest of the blob came from the primary"
