"""The scheduler's cached host view (``conductor.host_view``) at a thousand simulated hosts.

A second engine on the same SQLite file plays "another conductor" (or agents reporting): it
writes rows directly, as their object calls would, while this conductor decides. Intervals are
scaled down (service_down_time of seconds, refresh of tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conductor.db import migration
from conductor.db.session import Database, create_engine
from conductor.host_view import HostView, HostViewSettings
from conductor.scheduler import HostState, ResourceRequest, select_destinations
from conductor.tasks.hosts import PlacementLedger
from conductor.testing import hosts as sim

HOSTS = 1000
SMALL = ResourceRequest(vcpus=1, memory_mb=1024, disk_gb=10)


class Fleet:
    """This conductor's database, another writer's engine, and the hosts."""

    def __init__(self, database: Database, writer: Any, hosts: list[str]) -> None:
        self.database = database
        self.writer = writer
        self.hosts = hosts


@contextlib.asynccontextmanager
async def fleet_of(url: str, count: int) -> AsyncIterator[Fleet]:
    await migration.upgrade(url)
    database = Database(url)
    writer = create_engine(url)
    hosts = sim.host_names(count)
    # Created a while ago (older than any overlap), seen up now.
    await sim.insert_hosts(writer, hosts, stamp=sim.utcnow() - datetime.timedelta(seconds=30))
    try:
        yield Fleet(database, writer, hosts)
    finally:
        await writer.dispose()
        await database.dispose()


@pytest.fixture
async def fleet(sqlite_database_url: str) -> AsyncIterator[Fleet]:
    async with fleet_of(sqlite_database_url, HOSTS) as f:
        yield f


@pytest.fixture
async def small_fleet(sqlite_database_url: str) -> AsyncIterator[Fleet]:
    async with fleet_of(sqlite_database_url, 20) as f:
        yield f


async def decide(
    fleet: Fleet, view: HostView, ledger: PlacementLedger, req: ResourceRequest = SMALL
) -> tuple[str, int, list[HostState]]:
    """One scheduling decision as a build makes it: the chosen host, the statements it ran and
    the states it saw."""
    ctxt = types.SimpleNamespace(db=None)
    async with fleet.database.request(ctxt) as db:
        seen = await view.fleet(ctxt)
        states = ledger.apply(seen.states, seen.reported_at, seen.positions)
        picks = select_destinations(states, req, 1, floors=seen.floors)
        ledger.record(picks[0][0].host, req)
        return picks[0][0].host, db.statements, seen.states


async def test_a_decision_at_1000_hosts_runs_two_statements_and_reads_only_changed_rows(
    fleet: Fleet,
) -> None:
    down = 3.0
    view = HostView(
        HostViewSettings(
            service_down_time=down,
            refresh_interval=0.0,  # the worst case: every decision reads the changes
            overlap=0.2,
            full_refresh_interval=3600.0,
        )
    )
    ledger = PlacementLedger()
    _, statements, states = await decide(fleet, view, ledger)
    assert statements == 2 and len(states) == HOSTS
    assert (view.stats.last_node_rows, view.stats.last_service_rows) == (HOSTS, HOSTS)

    # In the background: a few hosts report new usage, and every host beats well within the
    # down time.
    changes: list[tuple[datetime.datetime, str]] = []
    rng = random.Random(14)

    beats = [0]

    async def background() -> None:
        beat = 0
        while True:
            stamp = sim.utcnow()
            usage = {h: rng.randrange(0, 32768) for h in rng.sample(fleet.hosts, 2)}
            await sim.report_usage(fleet.writer, usage, stamp=stamp)
            changes.extend((stamp, h) for h in usage)
            batch = [fleet.hosts[(beat + i) % HOSTS] for i in range(250)]
            beat += 250
            await sim.heartbeat(fleet.writer, batch)
            beats[0] += len(batch)
            await asyncio.sleep(0.05)

    def changed_after(since: datetime.datetime, upto: int) -> int:
        return len({h for stamp, h in changes[:upto] if stamp > since})

    writer = asyncio.create_task(background())
    try:
        decisions = []
        started = asyncio.get_running_loop().time()
        # Past half the down time, so hosts age and their liveness is read again.
        while asyncio.get_running_loop().time() - started < down * 0.75 or len(decisions) < 20:
            logged = len(changes)
            _, statements, states = await decide(fleet, view, ledger)
            stats = view.stats
            assert stats.last_since is not None
            decisions.append(
                (
                    statements,
                    stats.last_node_rows,
                    changed_after(stats.last_since, logged),
                    changed_after(stats.last_since, len(changes)),
                    stats.last_service_rows,
                    stats.last_ageing,
                    sum(s.service_up for s in states),
                )
            )
            await asyncio.sleep(0.03)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

    for statements, rows, least, most, service_rows, ageing, up in decisions:
        # Bounded whatever the host count: the two delta reads, nothing per host.
        assert statements == 2
        # Exactly the nodes changed since the read's stamp (a change committing during the
        # decision may or may not be in it), a small part of the fleet.
        assert least <= rows <= most, decisions
        assert rows < HOSTS // 10
        # Liveness: only hosts near the down time are asked about, only those that beat come
        # back; every host stays up.
        assert service_rows <= ageing
        assert up == HOSTS
    stats = view.stats
    assert stats.full_reads == 1
    # A host's liveness is read again only after a new beat (and once it is near the down
    # time): far fewer rows than beats, and it was read again.
    assert 0 < stats.service_rows - HOSTS <= beats[0]
    # The uncached read took every row of both tables per decision.
    uncached = len(decisions) * 2 * HOSTS
    assert stats.node_rows + stats.service_rows - 2 * HOSTS < uncached / 10


async def test_changes_written_elsewhere_are_seen_within_the_refresh_bound(
    small_fleet: Fleet,
) -> None:
    refresh = 0.2
    view = HostView(
        HostViewSettings(
            service_down_time=60.0,
            refresh_interval=refresh,
            overlap=1.0,
            full_refresh_interval=3600,
        )
    )
    ledger = PlacementLedger()
    await decide(small_fleet, view, ledger)
    full, busy, disabled, gone, no_node, marked, forced, skewed = small_fleet.hosts[:8]
    w = small_fleet.writer
    await sim.report_usage(w, {full: 65536 * 3 // 2})
    await sim.report_usage(w, {skewed: 1000}, stamp=sim.utcnow() - datetime.timedelta(seconds=0.5))
    await sim.update_service(w, disabled, {"disabled": True})
    await sim.update_service(
        w, gone, {"deleted": True, "deleted_at": sim.utcnow()}, touch=False
    )  # a soft delete sets deleted_at only
    await sim.delete_node(w, no_node)
    await sim.update_service(w, marked, {"last_seen_up": None})  # the agent's mark-down
    await sim.update_service(w, forced, {"forced_down": True})
    await sim.insert_hosts(w, ["newcomer"])
    del busy

    await asyncio.sleep(refresh)
    _, statements, states = await decide(small_fleet, view, ledger)
    assert statements == 2 and view.stats.full_reads == 1
    by_host = {s.host: s for s in states}
    assert by_host[full].memory_mb_used == 65536 * 3 // 2
    assert by_host[skewed].memory_mb_used == 1000  # stamped behind, within the overlap
    assert by_host[disabled].service_disabled
    assert gone not in by_host and no_node not in by_host
    assert not by_host[marked].service_up and not by_host[forced].service_up
    assert "newcomer" in by_host and by_host["newcomer"].service_up

    refused = {full, disabled, gone, no_node, marked, forced}
    for _ in range(40):
        host, _, _ = await decide(small_fleet, view, ledger)
        assert host not in refused


async def test_a_silent_host_goes_down_and_comes_back_when_it_beats(small_fleet: Fleet) -> None:
    down = 1.0
    view = HostView(HostViewSettings(service_down_time=down, refresh_interval=0.1, overlap=0.5))
    ledger = PlacementLedger()
    _silent, *others = small_fleet.hosts
    await decide(small_fleet, view, ledger)
    loop = asyncio.get_running_loop()
    until = loop.time() + down * 1.5
    while loop.time() < until:
        await sim.heartbeat(small_fleet.writer, others)
        _, statements, states = await decide(small_fleet, view, ledger)
        assert statements <= 2
        await asyncio.sleep(0.1)
    up = {s.host for s in states if s.service_up}
    assert up == set(others)  # no row changed: it went down by silence

    await sim.heartbeat(small_fleet.writer, small_fleet.hosts)
    await asyncio.sleep(0.1)
    _, _, states = await decide(small_fleet, view, ledger)
    assert all(s.service_up for s in states)


async def test_a_change_the_deltas_miss_is_read_by_the_full_refresh(small_fleet: Fleet) -> None:
    view = HostView(
        HostViewSettings(
            service_down_time=60.0, refresh_interval=0.05, overlap=0.5, full_refresh_interval=0.6
        )
    )
    ledger = PlacementLedger()
    await decide(small_fleet, view, ledger)
    host = small_fleet.hosts[3]
    # Stamped far behind the database's clock (a writer's clock an hour late).
    late = sim.utcnow() - datetime.timedelta(hours=1)
    await sim.report_usage(small_fleet.writer, {host: 4242}, stamp=late)
    await asyncio.sleep(0.1)
    _, _, states = await decide(small_fleet, view, ledger)
    assert {s.host: s for s in states}[host].memory_mb_used == 0  # the delta missed it
    await asyncio.sleep(0.6)
    _, _, states = await decide(small_fleet, view, ledger)
    assert view.stats.full_reads == 2
    assert {s.host: s for s in states}[host].memory_mb_used == 4242


async def test_a_burst_between_refreshes_spreads_over_hosts(small_fleet: Fleet) -> None:
    """The view is cached, usage lags: the placement ledger still spreads a burst."""
    view = HostView(HostViewSettings(refresh_interval=60.0))
    ledger = PlacementLedger()
    big = ResourceRequest(vcpus=1, memory_mb=65536, disk_gb=10)
    chosen = [(await decide(small_fleet, view, ledger, big))[0] for _ in range(10)]
    assert len(set(chosen)) == 10
    assert view.stats.statements == 2  # one read for the whole burst
