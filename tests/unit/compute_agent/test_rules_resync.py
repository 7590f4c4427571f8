"""RulesResync: one resync at a time; a request during one schedules exactly one more."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from compute_agent.security_groups import RulesResync
from shared_objects.exception import DatabaseUnavailable


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


async def test_requests_during_a_resync_add_exactly_one_more() -> None:
    gate = asyncio.Event()
    reasons: list[str] = []
    running = 0
    overlapped = False

    async def run(reason: str) -> None:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        reasons.append(reason)
        await gate.wait()
        running -= 1

    resync = RulesResync(run, _spawn)
    resync.start()
    await asyncio.sleep(0)
    for _ in range(5):
        resync.request("reconnect")  # while the first one runs
    gate.set()
    await resync.wait_idle()
    assert reasons == ["start", "reconnect"]
    assert not overlapped and resync.runs == 2

    resync.request("reconnect")  # idle again: runs at once
    await resync.wait_idle()
    assert reasons == ["start", "reconnect", "reconnect"]


async def test_a_failed_resync_is_logged_and_the_next_request_runs() -> None:
    calls = 0

    async def run(reason: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DatabaseUnavailable(reason="down")

    resync = RulesResync(run, _spawn)
    resync.start()
    await resync.wait_idle()
    resync.request("reconnect")
    await resync.wait_idle()
    assert calls == 2


async def test_stop_cancels_a_running_resync_and_refuses_requests_until_started() -> None:
    started = asyncio.Event()

    async def run(reason: str) -> None:
        started.set()
        await asyncio.Event().wait()

    resync = RulesResync(run, _spawn)
    resync.start()
    await started.wait()
    await resync.stop()
    resync.request("reconnect")
    await resync.wait_idle()
    assert resync.runs == 0
