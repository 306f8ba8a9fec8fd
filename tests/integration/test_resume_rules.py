"""README's stall-proof streaming rules on the registry source in this process, with README's default budget
(--max-resumes 10, at most 2 resumes in a row that bring less than 1 MiB within 60 s) and a stall deadline of
half a second instead of 30 s (a body is read by a worker thread, whose socket deadline is real time: a trio
MockClock cannot shorten it). tests/faults/test_resume_budget.py checks the same budget on a spawned daemon through
the fault proxy; this file also lets the mutation run (docs/TESTING.md) reach proxy/registry/resume.py, which it
traces only in the pytest process.

The registry is the scripted server of tests/support/fake_registry.py. Its blob is served by :class:`FlakyBlob`,
which honours ``Range: bytes=N-`` with a 206 (or ignores it with a 200, or answers a wrong Content-Range) and goes
silent at the offsets a test names, keeping the connection open: a stall.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio

from protocol.errors import ErrorCode
from proxy.config import CredentialSource
from proxy.http.pool import ConnectionPool
from proxy.http.proxies import ProxyConfig
from proxy.http.timeouts import Timeouts
from proxy.registry.client import RegistryClient, RegistrySettings
from proxy.registry.source import RegistrySource, open_registry
from proxy.sources.base import SourceError
from tests.http.server import Recorded, Reply
from tests.support.documented import README, number, numbers
from tests.support.fake_registry import Blob, FakeRegistry, make_image, serve_registry
from tests.support.images import pseudo_random

MAX_RESUMES, IN_A_ROW, PROGRESS_MIB, PROGRESS_SECONDS = numbers(
    README,
    r"at most `--max-resumes` resumes per blob \((\d+)\), and at most (\d+) resumes in a row after attempts that "
    r"each brought less than (\d+) MiB and came within (\d+) s of the previous one",
)
STALLS_FOR_GOOD = number(README, r"is reported after at most (\w+) stalls \(the one that stopped it")
MIB = 1 << 20
#: the stall deadline here: loopback in this process sends 1.5 MiB in milliseconds
STALL = 0.5
#: a resume costs the stall deadline plus a re-request: at most this much longer (slack for a loaded machine)
RESUME_SLACK = 1.0
HANG_GUARD = 60.0


@attrs.define
class FlakyBlob:
    """The blob's route: request ``n`` (from 0) goes silent at the resource offset ``stall_at(n, start)`` (None:
    it completes); ``answer(n)`` picks "206" (honour the Range), "200" (ignore it) or "wrong-range"."""

    data: bytes
    path: str
    stall_at: Callable[[int, int], int | None]
    answer: Callable[[int], str] = lambda n: "206"
    #: (virtual time, first offset asked for) of each request
    requests: list[tuple[float, int]] = attrs.Factory(list)

    def __call__(self, request: Recorded) -> Reply | None:
        if request.target.split("?")[0] != self.path:
            return None
        n = len(self.requests)
        asked = request.headers.get("range")
        start = int(asked.removeprefix("bytes=").removesuffix("-")) if asked else 0
        self.requests.append((trio.current_time(), start))
        kind = self.answer(n) if asked else "200"
        if kind == "200":
            start = 0
        headers = [("Content-Type", "application/octet-stream")]
        if kind != "200":
            shown = start + 1 if kind == "wrong-range" else start
            headers.append(("Content-Range", f"bytes {shown}-{len(self.data) - 1}/{len(self.data)}"))
        stop = self.stall_at(n, start)
        return Reply(
            status=200 if kind == "200" else 206,
            headers=headers,
            body=self.data[start:],
            stall_after=None if stop is None else max(0, stop - start),
        )


@attrs.define
class Scene:
    registry: FakeRegistry
    source: RegistrySource
    blob: Blob
    flaky: FlakyBlob

    async def read(self) -> tuple[bytes, SourceError | None]:
        """Every byte the blob delivered, and the error that ended it (None: it ended at its size)."""
        parts: list[bytes] = []
        try:
            with trio.fail_after(HANG_GUARD):
                return await self._read(parts)
        except SourceError as e:
            return b"".join(parts), e

    async def _read(self, parts: list[bytes]) -> tuple[bytes, None]:
        reader = await self.source.open_blob(self.blob.digest, self.blob.size)
        async with reader:
            while chunk := await reader.read(1 << 20):
                parts.append(chunk)
        return b"".join(parts), None


@pytest.fixture
async def scene_for() -> AsyncIterator[Callable[..., Scene]]:
    """``scene_for(size, stall_at, answer=...)``: a registry serving one image whose layer (``size`` bytes) is a
    :class:`FlakyBlob`, and the registry source of that image with README's defaults but the stall deadline."""
    async with serve_registry() as registry:
        settings = RegistrySettings(tls_verify=False, timeouts=Timeouts(connect=5, tls=5, headers=5, stall=STALL))
        client = RegistryClient(settings, CredentialSource())
        client.pool = ConnectionPool(settings.timeouts, client._ssl_context, proxies=ProxyConfig())

        async def make(size: int, stall_at: Callable[[int, int], int | None], **kwargs) -> Scene:
            image = make_image("resume")
            blob = Blob(pseudo_random("resume", size))
            registry.add_image("resume/image", "latest", attrs.evolve(image, layers=(blob,)))
            flaky = FlakyBlob(blob.data, registry.blob_path("resume/image", blob.digest), stall_at, **kwargs)
            registry.server.gate = flaky
            reference = registry.ref("resume/image")
            source = await open_registry(reference, reference.removeprefix("docker:"), client)
            return Scene(registry, source, blob, flaky)

        try:
            yield make
        finally:
            await client.aclose()


def stuck_at(offset: int) -> Callable[[int, int], int]:
    """A blob that stops at ``offset`` for good: every request goes silent there (at once, when it starts there)."""
    return lambda n, start: offset


async def test_the_documented_defaults_are_these() -> None:
    assert (MAX_RESUMES, IN_A_ROW, PROGRESS_MIB, PROGRESS_SECONDS) == (10, 2, 1, 60)
    assert STALLS_FOR_GOOD == 4


async def test_one_stall_is_resumed_where_it_stopped_and_every_byte_comes_once(scene_for) -> None:
    cut = 700_000
    scene = await scene_for(3 * MIB, lambda n, start: cut if n == 0 else None)
    data, error = await scene.read()
    assert error is None and data == scene.blob.data
    (t0, first), (t1, second) = scene.flaky.requests
    assert (first, second) == (0, cut)
    assert STALL * 0.9 <= t1 - t0 < STALL + RESUME_SLACK, "the stall deadline, then the resume"


async def test_a_blob_that_stops_for_good_after_progress_gives_up_after_four_stalls(scene_for) -> None:
    cut = 2 * MIB  # more than 1 MiB came before the stall
    scene = await scene_for(3 * MIB, stuck_at(cut))
    started = trio.current_time()
    data, error = await scene.read()
    assert data == scene.blob.data[:cut]
    assert error is not None and error.code is ErrorCode.RETRYABLE
    assert f"giving up at byte {cut} of {3 * MIB}" in str(error) and scene.registry.authority in str(error)
    assert f"after {STALLS_FOR_GOOD - 1} resumes" in str(error), str(error)
    assert [start for _, start in scene.flaky.requests] == [0] + [cut] * (STALLS_FOR_GOOD - 1)
    # "about 4 x --stall-timeout plus three re-requests"
    assert trio.current_time() - started < STALLS_FOR_GOOD * (STALL + RESUME_SLACK)


async def test_resumes_that_bring_less_than_a_mib_stop_after_two_in_a_row(scene_for) -> None:
    cut = 100_000
    scene = await scene_for(3 * MIB, stuck_at(cut))
    data, error = await scene.read()
    assert data == scene.blob.data[:cut] and error is not None
    assert len(scene.flaky.requests) == 1 + IN_A_ROW, scene.flaky.requests
    assert f"after {IN_A_ROW} resumes" in str(error)


async def test_a_transfer_that_keeps_making_progress_may_use_all_ten_resumes(scene_for) -> None:
    """A stall after every 1.5 MiB: each resume brought more than 1 MiB, so only --max-resumes (10) stops it."""
    step = 3 * MIB // 2
    size = step * (MAX_RESUMES + 3)
    scene = await scene_for(size, lambda n, start: start + step)
    data, error = await scene.read()
    assert error is not None and f"after {MAX_RESUMES} resumes" in str(error), error
    assert data == scene.blob.data[: step * (MAX_RESUMES + 1)]
    assert len(scene.flaky.requests) == 1 + MAX_RESUMES


async def test_a_200_answer_to_a_resume_is_read_past_the_bytes_already_delivered(scene_for) -> None:
    cut = 1_234_567
    scene = await scene_for(3 * MIB, lambda n, start: cut if n == 0 else None, answer=lambda n: "200")
    data, error = await scene.read()
    assert error is None and data == scene.blob.data
    assert [start for _, start in scene.flaky.requests] == [0, cut]  # asked from the cut, answered from 0


async def test_a_206_that_does_not_start_at_the_offset_asked_is_refused(scene_for) -> None:
    cut = 1_500_000
    scene = await scene_for(
        3 * MIB, lambda n, start: cut if n == 0 else None, answer=lambda n: "wrong-range" if n == 1 else "206"
    )
    data, error = await scene.read()
    assert error is None and data == scene.blob.data, "the wrong answer was refused, the next one used"
    assert [start for _, start in scene.flaky.requests] == [0, cut, cut]
