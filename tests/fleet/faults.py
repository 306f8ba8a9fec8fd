"""The fault proxy of tests/faults/proxy.py running on a fleet host, between the cache host's nginx and its registry.

``with fault_proxy_on(host, REGISTRY_PORT) as fault:`` runs :func:`tests.faults.proxy.fault_proxy` in a thread of its
own that joined ``host``'s network namespace, with its own trio loop: it listens on 127.0.0.1 *of that host* and
forwards to the registry on the same host's loopback. ``fault.port`` is where nginx should send requests; rules are
added before traffic starts; its records are read from this thread (plain lists, appended by the other one).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import trio

from tests.faults.proxy import FaultProxy, fault_proxy
from tests.fleet.netns import Host, _enter

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@contextlib.contextmanager
def fault_proxy_on(host: Host, upstream_port: int) -> Iterator[FaultProxy]:
    ready = threading.Event()
    box: dict[str, object] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            box["scope"] = scope
            async with fault_proxy(upstream_port) as proxy:
                box["proxy"] = proxy
                ready.set()
                await trio.sleep_forever()

    def thread_main() -> None:
        try:
            _enter(host.netns)
            trio.run(main)
        except BaseException as e:
            box["error"] = e
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name=f"fault-proxy-{host.role}", daemon=True)
    thread.start()
    if not ready.wait(START_TIMEOUT) or "proxy" not in box:
        raise RuntimeError(f"the fault proxy did not start on {host.role}: {box.get('error')!r}")
    try:
        yield box["proxy"]  # type: ignore[misc]
    finally:
        token: trio.lowlevel.TrioToken = box["token"]  # type: ignore[assignment]
        scope: trio.CancelScope = box["scope"]  # type: ignore[assignment]
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(scope.cancel)  # thread-safe, and callable from this thread's own trio loop
        thread.join(STOP_TIMEOUT)
