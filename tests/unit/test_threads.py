"""Worker threads are shared fairly: one client's blocking calls hold at most its own share (proxy/common/threads)."""

from __future__ import annotations

import threading

import trio

from proxy.common import threads


async def test_a_client_holds_at_most_its_share_of_worker_threads() -> None:
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def blocking() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1

    limiters: list[trio.CapacityLimiter] = []

    async def client(share: int, calls: int, started: trio.Event) -> None:
        with threads.client_threads(share) as limiter:
            limiters.append(limiter)
            async with trio.open_nursery() as nursery:
                for _ in range(calls):
                    nursery.start_soon(threads.run_sync, blocking)
                started.set()

    greedy_started = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, 2, 10, greedy_started)
        await greedy_started.wait()
        await trio.testing.wait_all_tasks_blocked()
        # ten calls, two threads: the rest wait for the client's share, not for the process's threads
        assert limiters[0].borrowed_tokens == 2
        assert limiters[0].statistics().tasks_waiting == 8
        assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 2
        # another client still gets a thread at once
        with trio.fail_after(5):
            await trio.to_thread.run_sync(lambda: None)
        release.set()
    assert running == 0 and most <= 2


async def test_work_of_the_process_is_not_counted_against_a_client() -> None:
    seen: list[object] = []

    async def shared_download() -> None:
        threads.no_client_threads()
        seen.append(threads._client_limiter.get())

    with threads.client_threads(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shared_download)
            seen.append(threads._client_limiter.get())
    assert seen[0] is None or seen[1] is None
    assert any(isinstance(x, trio.CapacityLimiter) for x in seen)
