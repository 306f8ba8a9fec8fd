"""README's promises about registry errors, each pinned to the number README states (read from README itself, see
tests/support/documented.py), against a scripted registry on 127.0.0.1 (tests/support/fake_registry.py):

- "OpenImageOptional answers 0 only for a real MANIFEST_UNKNOWN/NAME_UNKNOWN from the registry": an unreachable
  registry, a 5xx and a refusal are errors, never "image absent";
- "5xx, 429, timeouts and network errors carry error_code "retryable" after up to 4 tries";
- "full-jitter backoff that honours Retry-After (capped at 30 s, all within 60 s)": with a trio MockClock, so the
  test waits for none of those seconds.

``trio.fail_after`` is a hang guard only.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from protocol.client import ImageProxy
from protocol.errors import ErrorCode, ProxyError
from proxy.config import CredentialSource
from proxy.http.pool import ConnectionPool
from proxy.http.proxies import ProxyConfig
from proxy.registry.client import RegistryClient, RegistryError, RegistrySettings
from tests.http.server import Recorded, Reply
from tests.support.documented import README, number, numbers, promise
from tests.support.fake_registry import FakeRegistry, make_image, serve_registry

HANG_GUARD = 30.0
#: README: "... carry error_code "retryable" after up to 4 tries"
TRIES = number(README, r'carry `error_code: "retryable"` after up to (\d+) tries')
#: README: "... honours Retry-After (capped at 30 s, all within 60 s)"
RETRY_AFTER_CAP, RETRY_DEADLINE = numbers(README, r"honours `Retry-After` \(capped at (\d+) s, all within (\d+) s\)")
#: README: "OpenImageOptional answers 0 only for a real MANIFEST_UNKNOWN/NAME_UNKNOWN from the registry"
NOT_FOUND_SENTENCE = r"`OpenImageOptional` answers 0 only for a real `MANIFEST_UNKNOWN`/`NAME_UNKNOWN` from the"


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    async with serve_registry() as running:
        yield running


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound and not listening: every connection to it is refused, for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def distribution_error(code: str) -> Reply:
    body = json.dumps({"errors": [{"code": code, "message": code.lower().replace("_", " ")}]}).encode()
    return Reply(status=404, headers=[("Content-Type", "application/json")], body=body)


# ------------------------------------------------------------------------------- OpenImageOptional: 0 means absent


async def test_open_image_optional_answers_0_only_for_a_registry_that_says_not_found(
    registry: FakeRegistry, closed_port: int
) -> None:
    promise(README, NOT_FOUND_SENTENCE)  # the rule tested here is still the one README states
    registry.manifest("gone/manifest", "latest", distribution_error("MANIFEST_UNKNOWN"))
    registry.manifest("gone/name", "latest", distribution_error("NAME_UNKNOWN"))
    # Retry-After 0: the retries cost no time
    registry.manifest("down/image", "latest", Reply(status=503, headers=[("Retry-After", "0")], body=b"down\n"))
    registry.manifest("private/image", "latest", Reply(status=401, body=b"go away\n"))
    registry.manifest("plain404/image", "latest", Reply(status=404, body=b"no distribution error code\n"))
    present = make_image("present")
    registry.add_image("present/image", "latest", present)
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=["--tls-verify=false"]) as proxy:
            assert await proxy.open_image_optional(registry.ref("gone/manifest")) is None
            assert await proxy.open_image_optional(registry.ref("gone/name")) is None
            unreachable = f"docker://127.0.0.1:{closed_port}/some/image:latest"
            for reference, code in [
                (unreachable, ErrorCode.RETRYABLE),
                (registry.ref("down/image"), ErrorCode.RETRYABLE),
                (registry.ref("private/image"), ErrorCode.OTHER),
                (registry.ref("plain404/image"), None),
            ]:
                with pytest.raises(ProxyError) as caught:
                    await proxy.open_image_optional(reference)
                assert "OpenImageOptional" in str(caught.value), f"{reference}: {caught.value}"
                if code is not None:
                    assert caught.value.code is code, f"{reference}: {caught.value.code} {caught.value}"
            # and an image that is there opens
            image = await proxy.open_image_optional(registry.ref("present/image"))
            assert image is not None and image > 0
            assert await proxy.get_manifest(image) == (present.digest, present.manifest)


# ------------------------------------------------------------------------------- retries: how many


async def test_a_persistent_503_is_tried_exactly_as_often_as_readme_says(registry: FakeRegistry) -> None:
    assert TRIES == 4
    registry.manifest("down/image", "latest", Reply(status=503, headers=[("Retry-After", "0")], body=b"down\n"))
    with trio.fail_after(HANG_GUARD):
        async with ImageProxy.spawn(extra_args=["--tls-verify=false"]) as proxy:
            with pytest.raises(ProxyError) as caught:
                await proxy.open_image(registry.ref("down/image"))
    assert caught.value.code is ErrorCode.RETRYABLE
    assert f"gave up after {TRIES} attempts" in str(caught.value)
    assert len(registry.requests_for(registry.manifest_path("down/image", "latest"))) == TRIES


# ------------------------------------------------------------------------------- retries: how long


#: the mock clock jumps to the next deadline once the run has been idle this long in real time (loopback I/O in
#: this process takes microseconds; a thread loading the trust store, milliseconds)
IDLE_BEFORE_JUMP = 1.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """pytest-trio runs the test on this clock: trio.sleep(30) takes no real 30 s."""
    return trio.testing.MockClock(autojump_threshold=IDLE_BEFORE_JUMP)


def make_client() -> RegistryClient:
    """The registry client with README's default retry policy (nothing overridden) and plain HTTP allowed."""
    settings = RegistrySettings(tls_verify=False)
    client = RegistryClient(settings, CredentialSource())
    client.pool = ConnectionPool(settings.timeouts, client._ssl_context, proxies=ProxyConfig())  # no ambient proxies
    return client


async def test_retry_after_is_capped_and_every_retry_ends_within_the_deadline(
    registry: FakeRegistry, clock: trio.testing.MockClock
) -> None:
    """A registry that asks for an hour's patience (Retry-After: 3600) on every try: each wait is the cap, and no
    try starts later than the deadline after the first; then the error, retryable, at once."""
    assert (RETRY_AFTER_CAP, RETRY_DEADLINE) == (30, 60)
    path = registry.manifest_path("throttled/image", "latest")
    registry.manifest("throttled/image", "latest", Reply(status=429, headers=[("Retry-After", "3600")], body=b"no\n"))
    tried_at: list[float] = []

    def note(request: Recorded) -> None:
        if request.target.split("?")[0] == path:
            tried_at.append(trio.current_time())

    registry.server.gate = note
    client = make_client()
    try:
        started = trio.current_time()
        with pytest.raises(RegistryError) as caught:
            await client.get(registry.authority, "throttled/image", "manifests/latest")
        gave_up = trio.current_time()
    finally:
        await client.aclose()
    expected_tries = min(TRIES, 1 + RETRY_DEADLINE // RETRY_AFTER_CAP)
    assert len(tried_at) == expected_tries, tried_at
    gaps = [later - earlier for earlier, later in itertools.pairwise(tried_at)]
    assert all(gap == pytest.approx(RETRY_AFTER_CAP, abs=0.5) for gap in gaps), gaps
    assert tried_at[-1] - started <= RETRY_DEADLINE + 0.5
    assert gave_up - tried_at[-1] < 0.5, "the next wait would end past the deadline: no waiting for it"
    assert caught.value.code is ErrorCode.RETRYABLE
    assert f"gave up after {expected_tries} attempts" in str(caught.value)


async def test_a_short_retry_after_is_honoured_as_given(registry: FakeRegistry, clock: trio.testing.MockClock) -> None:
    """Under the cap, Retry-After is the wait (not the backoff's random draw)."""
    throttled = make_image("throttled")
    registry.add_image("throttled/image", "latest", throttled)
    path = registry.manifest_path("throttled/image", "latest")
    registry.manifest(
        "throttled/image",
        "latest",
        Reply(status=429, headers=[("Retry-After", "7")], body=b"slow down\n"),
        Reply(status=429, headers=[("Retry-After", "12")], body=b"slow down\n"),
        Reply(headers=[("Content-Type", "application/vnd.oci.image.manifest.v1+json")], body=throttled.manifest),
    )
    tried_at: list[float] = []
    registry.server.gate = lambda r: tried_at.append(trio.current_time()) if r.target.split("?")[0] == path else None
    client = make_client()
    try:
        response = await client.get(registry.authority, "throttled/image", "manifests/latest")
        async with response:
            assert response.status == 200
            assert await response.read_all(1 << 20) == throttled.manifest
    finally:
        await client.aclose()
    gaps = [later - earlier for earlier, later in itertools.pairwise(tried_at)]
    assert gaps == [pytest.approx(7, abs=0.5), pytest.approx(12, abs=0.5)]
