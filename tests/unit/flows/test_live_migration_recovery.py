"""Recovery of live migrations cut by an agent crash, in every phase, from either side.

Each case puts the two hypervisors and the database in the state a crash in that phase leaves
(through the drivers' own API, as the agents would have), restarts the source, the destination,
or one while the other is still down and then the other; and checks that the instance ends on
the one host whose hypervisor runs it, task_state None, Migration ``completed`` if the guest had
switched over and ``error`` otherwise, claims right on both hosts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from live_migration_helpers import (
    DEST_INVOLVED,
    boot,
    check_invariants,
    instance,
    latest_fault,
    stage_crash,
    wait_idle,
    wait_migration,
)

from compute_agent.virt.migration_model import MigrationModel
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration

FAST = MigrationModel(bandwidth_mb_s=4000, round_interval_s=0.01)

# Phase -> (host the instance must end on, final Migration status).
EXPECTED = {
    "accepted": ("host-a", "error"),
    "queued": ("host-a", "error"),
    "preparing": ("host-a", "error"),
    "prepared": ("host-a", "error"),
    "running": ("host-a", "error"),
    "switched": ("host-b", "completed"),
    "post": ("host-b", "completed"),
    "post-resumed": ("host-b", "completed"),
    "post-moved": ("host-b", "completed"),
}
CASES = [
    (phase, mode)
    for phase in EXPECTED
    for mode in ("source", "dest", "source-first", "dest-first")
    if phase in DEST_INVOLVED or mode == "source"
]


@pytest.mark.parametrize(("phase", "mode"), CASES)
async def test_crash_in_every_phase_ends_on_one_host(
    lm_fleet_factory: Any, phase: str, mode: str
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await stage_crash(fleet, uuid, phase)
        if mode in ("source", "dest"):
            host = "host-a" if mode == "source" else "host-b"
            await fleet.crash(host)
            await fleet.restart(host)
        else:
            first, second = ("host-a", "host-b") if mode == "source-first" else ("host-b", "host-a")
            await fleet.crash("host-a")
            await fleet.crash("host-b")
            await fleet.restart(first)
            # A staggered restart: the first side runs alone for a while (its start-up
            # recovery already ran inside restart(); this gives its sweeper a turn).
            await asyncio.sleep(0.5)
            inst = await instance(fleet, uuid)
            if inst.task_state is None:
                # Settled with the peer down: only what one side can prove alone.
                assert inst.host == EXPECTED[phase][0]
            await fleet.restart(second)
        host, status = EXPECTED[phase]
        inst = await wait_idle(fleet, uuid)
        assert (inst.host, inst.vm_state) == (host, "active")
        assert (await wait_migration(fleet, mig))["status"] == status
        if status == "error":
            assert "settled on host-a" in await latest_fault(fleet, uuid)
        await check_invariants(fleet)


@pytest.mark.parametrize("phase", ["accepted", "queued"])
async def test_migration_whose_conductor_vanished_is_swept_by_its_source(
    lm_fleet_factory: Any, phase: str
) -> None:
    from shared_objects.context import RequestContext

    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await stage_crash(fleet, uuid, phase)
        manager = fleet.agents["host-a"].live_migration
        ctxt = RequestContext(user_id="compute")
        as_source = fleet.agents["host-a"].run_as_agent
        assert await as_source(manager.sweep_orphans(ctxt)) == 0  # young: a conductor may own it
        assert (await instance(fleet, uuid)).task_state == "migrating"
        manager.settings.orphan_after = 0.0
        assert await as_source(manager.sweep_orphans(ctxt)) == 1
        inst = await wait_idle(fleet, uuid)
        assert inst.host == "host-a"
        assert (await wait_migration(fleet, mig))["status"] == "error"
        assert "conductor lost" in await latest_fault(fleet, uuid)
        await check_invariants(fleet)


async def test_abort_reaching_the_source_before_the_migration_call_cancels_it(
    lm_fleet_factory: Any,
) -> None:
    from shared_objects.context import RequestContext

    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await stage_crash(fleet, uuid, "queued")
        manager = fleet.agents["host-a"].live_migration
        ctxt = RequestContext(user_id="u1", project_id="p1")
        as_source = fleet.agents["host-a"].run_as_agent
        await as_source(manager.live_migration_abort(ctxt, mig))  # no job yet: remembered
        async with fleet.db() as dctxt:
            inst = await Instance.get_by_uuid(dctxt, uuid)
            migration = await Migration.get_by_uuid(dctxt, mig)
        outcome = await as_source(manager.live_migration(ctxt, inst, migration, {}))
        assert outcome["status"] == "cancelled"
        assert (await wait_migration(fleet, mig))["status"] == "cancelled"
        assert (await wait_idle(fleet, uuid)).host == "host-a"
        await check_invariants(fleet)
