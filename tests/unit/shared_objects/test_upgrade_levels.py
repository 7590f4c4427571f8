from __future__ import annotations

import dataclasses
import datetime

import pytest

from shared_objects import releases
from shared_objects.testing.eventually import eventually
from shared_objects.upgrade_levels import UnknownUpgradeLevel, compute_levels, parse_level

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


@dataclasses.dataclass
class FakeService:
    host: str
    version: int
    last_seen_up: datetime.datetime | None = NOW
    forced_down: bool = False

    def is_up_at(self, now: datetime.datetime, service_down_time: float) -> bool:
        if self.forced_down or self.last_seen_up is None:
            return False
        return (now - self.last_seen_up).total_seconds() <= service_down_time


OLDEST = releases.RELEASES[0]
NEWEST = releases.CURRENT


def test_auto_cap_is_the_oldest_live_release() -> None:
    services = [FakeService("a", OLDEST.service_version), FakeService("b", NEWEST.service_version)]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == OLDEST
    assert levels.release_for("a") == OLDEST
    assert levels.release_for("b") == NEWEST


def test_dead_services_do_not_hold_the_cap_down() -> None:
    stale = NOW - datetime.timedelta(seconds=300)
    services = [
        FakeService("old", OLDEST.service_version, last_seen_up=stale),
        FakeService("new", NEWEST.service_version),
    ]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == NEWEST
    # The dead host still gets objects it understands if anything is sent to it.
    assert levels.release_for("old") == OLDEST


def test_without_live_agents_the_cap_stays_at_the_oldest_supported_release() -> None:
    # An old agent registering right after this refresh must not be sent what it cannot read.
    levels = compute_levels([], now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == OLDEST
    assert levels.release_for("unknown") == OLDEST


def test_a_host_registered_after_the_refresh_gets_the_oldest_release() -> None:
    services = [FakeService("b", NEWEST.service_version)]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == NEWEST
    assert levels.release_for("newcomer") == OLDEST


def test_release_for_a_compute_rpc_api_version() -> None:
    assert releases.for_compute_rpc_api(OLDEST.compute_rpc_api) == OLDEST
    assert releases.for_compute_rpc_api(NEWEST.compute_rpc_api) == NEWEST


def test_pinned_level_overrides_auto() -> None:
    services = [FakeService("b", NEWEST.service_version)]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=OLDEST)
    assert (levels.cap, levels.pinned) == (OLDEST, True)


def test_parse_level_accepts_auto_release_names_and_rpc_versions() -> None:
    assert parse_level("auto") is None
    assert parse_level(OLDEST.name) == OLDEST
    assert parse_level(NEWEST.compute_rpc_api).compute_rpc_api == NEWEST.compute_rpc_api
    with pytest.raises(UnknownUpgradeLevel, match="not a known release"):
        parse_level("9.9")


async def test_a_host_not_seen_yet_gets_the_oldest_release_and_a_refresh_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import contextlib
    from collections.abc import AsyncIterator
    from typing import Any

    from shared_objects.objects.service import ServiceList
    from shared_objects.upgrade_levels import ComputeUpgradeLevels

    now = datetime.datetime.now(datetime.UTC)
    rows = [FakeService("old", NEWEST.service_version, last_seen_up=now)]
    reads = 0

    async def get_by_binary(ctxt: Any, binary: str, include_disabled: bool = False) -> Any:
        nonlocal reads
        reads += 1
        return list(rows)

    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[Any]:
        yield None

    monkeypatch.setattr(ServiceList, "get_by_binary", get_by_binary)
    levels = ComputeUpgradeLevels("auto", context, refresh_interval=3600)
    await levels.start()
    try:
        assert reads == 1
        rows.append(FakeService("new", NEWEST.service_version, last_seen_up=now))
        # Until a refresh has seen it, the new host is sent the oldest release's versions.
        assert levels.release_for("new") == OLDEST
        assert levels.release_for("new") == OLDEST  # one refresh, not one per call
        await eventually(lambda: "new" in levels.levels.hosts, 1, interval=0.01)
        assert reads == 2
        assert levels.release_for("new") == NEWEST
        # A host that never registers costs at most one refresh per spacing interval.
        for _ in range(20):
            levels.release_for("ghost")
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # an absence check: a second read would have run by now
        assert reads == 2
    finally:
        await levels.stop()


async def test_on_demand_levels_are_read_only_when_used_after_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Agents: no timer (a timed read of every compute service by every agent costs the
    # conductors O(hosts²)); a use after refresh_interval starts one read in the background.
    import asyncio
    import contextlib
    from collections.abc import AsyncIterator
    from typing import Any

    from shared_objects.objects.service import ServiceList
    from shared_objects.upgrade_levels import ComputeUpgradeLevels

    now = datetime.datetime.now(datetime.UTC)
    reads = 0

    async def get_by_binary(ctxt: Any, binary: str, include_disabled: bool = False) -> Any:
        nonlocal reads
        reads += 1
        return [FakeService("a", NEWEST.service_version, last_seen_up=now)]

    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[Any]:
        yield None

    monkeypatch.setattr(ServiceList, "get_by_binary", get_by_binary)
    levels = ComputeUpgradeLevels("auto", context, refresh_interval=0.05, on_demand=True)
    await levels.start()
    try:
        assert reads == 0  # nothing at start: a fleet's restart would read O(hosts²) rows
        await asyncio.gather(*(levels.ensure_read() for _ in range(5)))  # the first use: one
        assert reads == 1
        await levels.ensure_read()
        await asyncio.sleep(0.2)  # idle: several intervals pass, nothing is read
        assert reads == 1
        assert levels.release_for("a") == NEWEST  # stale use: served, and a read starts
        await eventually(lambda: reads == 2, 1, interval=0.005, what="the background read")
        levels.release_for("a")  # fresh again: no read
        await asyncio.sleep(0.01)  # an absence check: a read would have started by now
        assert reads == 2
    finally:
        await levels.stop()


async def test_a_failed_first_read_is_tried_again_by_the_next_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import contextlib
    from collections.abc import AsyncIterator
    from typing import Any

    from shared_objects import exception
    from shared_objects.objects.service import ServiceList
    from shared_objects.upgrade_levels import ComputeUpgradeLevels

    now = datetime.datetime.now(datetime.UTC)
    reads = 0

    async def get_by_binary(ctxt: Any, binary: str, include_disabled: bool = False) -> Any:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise exception.DatabaseUnavailable(reason="test")
        return [FakeService("a", NEWEST.service_version, last_seen_up=now)]

    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[Any]:
        yield None

    monkeypatch.setattr(ServiceList, "get_by_binary", get_by_binary)
    levels = ComputeUpgradeLevels("auto", context, on_demand=True)
    await levels.start()
    try:
        await levels.ensure_read()  # fails quietly: the oldest release's versions meanwhile
        assert reads == 1 and levels.release_for("a") == releases.RELEASES[0]
        await levels.ensure_read()
        assert reads == 2 and levels.release_for("a") == NEWEST
    finally:
        await levels.stop()
