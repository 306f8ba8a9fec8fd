"""What the daemon tells about itself (issue 19), with the real parts: a real Prometheus server scrapes the daemon's
``--metrics-listen`` while clients pull from the real registry through the fault proxy (a stall and its resume, then
the same blobs from the cache, a request that fails); Prometheus's HTTP API must then hold the counts of what
happened. The textfile holds the same; the daemon's log has one line per transfer and per failed request."""

from __future__ import annotations

import hashlib
import re
import time

import trio
from prometheus_client.parser import text_string_to_metric_families

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.faults.conftest import FaultImages
from tests.faults.proxy import FaultProxy, Stall
from tests.metrics.conftest import free_port

HANG_GUARD = 120.0
#: a password handed to the daemon: it must never reach a log line
SECRET = "s3cret-Pa55word"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def pull_layers(socket_path, ref: str, layers) -> None:
    async with ImageProxy.connect(socket_path) as proxy:
        image = await proxy.open_image(ref)
        for layer in layers:
            assert sha256(await proxy.get_blob(image, layer.digest, layer.size)) == layer.digest


async def test_prometheus_sees_what_the_daemon_did(
    start_daemon, prometheus, fault_images: FaultImages, fault: FaultProxy, tmp_path
):
    port = free_port()
    textfile = tmp_path / "image-proxy.prom"
    daemon = await start_daemon(
        "--blob-cache",
        str(tmp_path / "cache"),
        "--stall-timeout",
        "1",
        "--metrics-listen",
        f"127.0.0.1:{port}",
        "--metrics-textfile",
        str(textfile),
        "--metrics-textfile-interval",
        "1",
        "--creds",
        f"someone:{SECRET}",
    )
    server = await prometheus(f"127.0.0.1:{port}")
    layers = [fault_images.seed, fault_images.long, fault_images.small]
    sizes = sum(layer.size for layer in layers)
    host = f"127.0.0.1:{fault.port}"
    ref = fault_images.ref(fault.port)
    stall_at = 1 << 20
    stall = fault.add_rule(Stall(at=stall_at), path=fault_images.long.digest, nth=1)

    with trio.fail_after(HANG_GUARD):
        await pull_layers(daemon.socket_path, ref, layers)  # from the registry: one stall, one resume
        assert len(stall.fired) == 1
        await pull_layers(daemon.socket_path, ref, layers)  # the same blobs, from the cache
        async with ImageProxy.connect(daemon.socket_path) as proxy:
            try:
                await proxy.open_image(fault_images.ref(fault.port, tag="no-such-tag"))
            except ProxyError:
                pass
            else:
                raise AssertionError("OpenImage of a missing tag succeeded")
        await daemon.wait_for(lambda: sum("closed" in line for line in daemon.log) >= 3, "3 connections closed")
        done = time.time()
        # a scrape that began after all of it (Prometheus scrapes every second)
        while (await server.value("timestamp(image_proxy_uptime_seconds)") or 0) <= done + 0.1:
            await trio.sleep(0.2)  # polling Prometheus for a newer scrape, within the hang guard

    assert await server.value('up{job="image-proxy"}') == 1
    blob_bytes = await server.values("image_proxy_blob_bytes_total", "source")
    assert blob_bytes == {"network": sizes, "cache": sizes, "local": 0}
    assert await server.values("image_proxy_upstream_bytes_total", "host") == {host: sizes}  # resumed, not again
    assert await server.values("image_proxy_stalls_total", "host") == {host: 1}
    resumes = await server.query("image_proxy_resumes_total")
    assert [(r["metric"]["host"], r["metric"]["cause"], r["value"][1]) for r in resumes] == [(host, "stall", "1")]
    assert await server.value("image_proxy_cache_hits_total") == 3
    assert await server.value("image_proxy_cache_misses_total") == 3
    requests = {
        (r["metric"]["method"], r["metric"]["outcome"]): float(r["value"][1])
        for r in await server.query("image_proxy_requests_total")
    }
    assert requests[("GetBlob", "ok")] == 6
    assert requests[("FinishPipe", "ok")] == 6
    assert requests[("OpenImage", "ok")] == 2
    assert requests[("OpenImage", "error")] == 1
    assert requests[("Initialize", "ok")] == 3
    assert await server.value('image_proxy_request_duration_seconds_count{method="GetBlob"}') == 6
    assert await server.values("image_proxy_transfers_total", "outcome") == {"ok": 6}
    assert await server.value("image_proxy_active_transfers") == 0
    assert await server.value("image_proxy_connections") == 0
    assert (await server.value("image_proxy_cache_bytes") or 0) >= sizes
    assert await server.query("image_proxy_mirror_fallbacks_total") == []  # no mirror configured
    assert await server.query("image_proxy_limit_refusals_total") == []
    assert (await server.value("process_resident_memory_bytes") or 0) > 0

    # the textfile: the same counts, written again after all of it, in the text format node_exporter reads
    families = {}
    with trio.fail_after(30):
        while True:
            text = textfile.read_text() if textfile.exists() else ""
            families = {f.name: f for f in text_string_to_metric_families(text)}
            if "image_proxy_transfers" in families and textfile.stat().st_mtime > done:
                break
            await trio.sleep(0.2)  # polling for the next write of the file, within the deadline
    sent = {
        s.labels["source"]: s.value for s in families["image_proxy_blob_bytes"].samples if s.name.endswith("_total")
    }
    assert sent == {"network": sizes, "cache": sizes, "local": 0}
    assert not any(name.startswith("process_") for name in families), "node_exporter has process_* of its own"

    # the log: one line per transfer (who, what, how much, from where, resumes), one per failed request, a warning
    # for the stall and the resume, never the password
    log = "\n".join(daemon.log)
    assert SECRET not in log
    long_lines = [line for line in daemon.log if f"GetBlob {ref} {fault_images.long.digest}: ok" in line]
    assert len(long_lines) == 2, log
    first, second = long_lines
    assert re.search(r"INFO image-proxy\.transfers: pid \d+ uid 0: ", first)
    assert f"{fault_images.long.size} bytes to the client" in first and "from the network" in first
    assert (
        f"({host}: {fault_images.long.size} bytes received, 1 resume (stall at byte {stall_at} from {host}))" in first
    )
    assert "from the cache" in second and "received" not in second
    assert sum(" ok; " in line and "image-proxy.transfers" in line for line in daemon.log) == 6
    assert re.search(rf"WARNING .*{fault_images.long.digest}: stalled at byte {stall_at} of \d+ from {host}", log)
    assert re.search(rf"WARNING .*{fault_images.long.digest}: resuming at byte {stall_at} of \d+ \(resume 1", log)
    failed = [line for line in daemon.log if "image-proxy.requests" in line]
    assert len(failed) == 1 and "OpenImage" in failed[0] and "no-such-tag" in failed[0] and " failed: " in failed[0]
