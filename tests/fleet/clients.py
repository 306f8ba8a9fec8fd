"""The nodes' update agents: each pulls the image through its own daemon with the client bindings, at once.

``await pull_everywhere(nodes, reference)`` returns one :class:`NodePull` per node: what was pulled (verified: the
client bindings check every blob's size and digest, on top of the daemon's own check), when each blob started and
finished, and how many bytes had arrived so far (``received``, updated while the pull runs). The agents do not
retry a failed blob (``retries=0``): what is measured is the daemon's own fallback, not a client's second try.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import attrs
import trio

from protocol.client import ImageProxy
from protocol.client.pull import BlobFinished, BlobProgress, BlobStarted, PulledImage, PullEvent, pull
from tests.fleet.hosts import Node
from tests.support.sinks import discard_all

#: a hang guard for one whole pull of the fleet (every wait inside has its own, shorter deadline)
PULL_GUARD = 120.0


@attrs.define
class NodePull:
    node: Node
    started: float = 0.0
    finished: float | None = None
    #: bytes of blobs received so far (all attempts)
    received: int = 0
    blob_started: dict[str, float] = attrs.field(factory=dict)
    blob_finished: dict[str, float] = attrs.field(factory=dict)
    image: PulledImage | None = None
    error: BaseException | None = None

    @property
    def seconds(self) -> float:
        assert self.finished is not None, "the pull has not finished"
        return self.finished - self.started

    def blob_seconds(self, digest: str) -> float:
        return self.blob_finished[digest] - self.blob_started[digest]


async def pull_on(
    state: NodePull, reference: str, concurrency: int = 4, on_event: Callable[[NodePull, PullEvent], None] | None = None
) -> None:
    """One node's pull into ``state``; its failure is kept in ``state.error``, not raised."""
    done_in_blob: dict[str, int] = {}

    def event(e: PullEvent) -> None:
        now = time.monotonic()
        if isinstance(e, BlobStarted):
            state.blob_started[e.blob.digest] = now
            done_in_blob[e.blob.digest] = 0
        elif isinstance(e, BlobProgress):
            state.received += e.done - done_in_blob.get(e.blob.digest, 0)
            done_in_blob[e.blob.digest] = e.done
        elif isinstance(e, BlobFinished):
            state.blob_finished[e.blob.digest] = now
        if on_event is not None:
            on_event(state, e)

    state.started = time.monotonic()
    try:
        async with ImageProxy.connect(state.node.socket) as proxy:
            state.image = await pull(proxy, reference, discard_all, concurrency=concurrency, retries=0, on_event=event)
    except Exception as e:  # kept for the test to report with the node's name and log
        state.error = e
    state.finished = time.monotonic()


async def pull_everywhere(
    nodes: Sequence[Node],
    reference: str,
    concurrency: int = 4,
    on_event: Callable[[NodePull, PullEvent], None] | None = None,
    during: Callable[[list[NodePull]], object] | None = None,
    guard: float = PULL_GUARD,
) -> list[NodePull]:
    """Every node pulls ``reference`` at once; ``during(states)`` (async) runs beside them (to break something
    mid-pull). Returns when every pull has ended (and ``during`` with them)."""
    states = [NodePull(node) for node in nodes]
    with trio.fail_after(guard):
        async with trio.open_nursery() as nursery:
            for state in states:
                nursery.start_soon(pull_on, state, reference, concurrency, on_event)
            if during is not None:
                nursery.start_soon(during, states)
    return states


def failures(states: Sequence[NodePull]) -> str:
    """The failed pulls, each with its error and the tail of its daemon's log ("" when none failed)."""
    text = []
    for state in states:
        if state.error is not None or state.image is None:
            log = "\n".join(state.node.log_text().splitlines()[-15:])
            text.append(f"{state.node.host.role}: {state.error!r}\n{log}")
    return "\n\n".join(text)
