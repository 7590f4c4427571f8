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
    boot,
    check_invariants,
    instance,
    latest_fault,
    wait_idle,
    wait_migration,
)

from compute_agent.virt.migration_model import MigrationModel
from shared_objects.fields import MigrationStatus, TaskState
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration

FAST = MigrationModel(bandwidth_mb_s=4000, round_interval_s=0.01)

STATUS = {
    "accepted": MigrationStatus.ACCEPTED,
    "queued": MigrationStatus.QUEUED,
    "preparing": MigrationStatus.PREPARING,
    "prepared": MigrationStatus.PREPARING,
    "running": MigrationStatus.RUNNING,
    "switched": MigrationStatus.RUNNING,
    "post": MigrationStatus.POST_MIGRATING,
    "post-resumed": MigrationStatus.POST_MIGRATING,
    "post-moved": MigrationStatus.POST_MIGRATING,
}
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
# Phases in which the destination holds something a restart of it must settle.
DEST_INVOLVED = {"prepared", "running", "switched", "post", "post-resumed", "post-moved"}


async def _stage(fleet: Any, uuid: str, phase: str) -> str:
    """Leave the fleet as a crash in ``phase`` would."""
    a, b = fleet.driver("host-a"), fleet.driver("host-b")
    async with fleet.db() as ctxt:
        inst = await Instance.get_by_uuid(ctxt, uuid)
        inst.task_state = TaskState.MIGRATING
        await inst.save(expected_task_state=[None])
        migration = Migration(
            ctxt,
            instance_uuid=uuid,
            source_compute="host-a",
            source_node="host-a",
            dest_compute=None if phase == "accepted" else "host-b",
            dest_node=None if phase == "accepted" else "host-b",
            status=STATUS[phase],
            migration_type="live-migration",
        )
        await migration.create()
    if phase in DEST_INVOLVED:
        dest_data = await b.check_can_live_migrate_destination(inst, "host-a")
        data = await a.check_can_live_migrate_source(inst, dest_data)
        await b.pre_live_migration(inst, data)
        await fleet.agents["host-b"].tracker.claim(inst)
        if phase in {"switched", "post", "post-resumed", "post-moved"}:
            await a.live_migration(inst, "host-b", data)
        if phase in {"post-resumed", "post-moved"}:
            await b.post_live_migration_at_destination(inst)
        if phase == "post-moved":
            async with fleet.db() as ctxt:
                inst = await Instance.get_by_uuid(ctxt, uuid)
                inst.host, inst.node, inst.task_state = "host-b", "host-b", None
                await inst.save(expected_task_state=[TaskState.MIGRATING])
    return migration.uuid


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
        mig = await _stage(fleet, uuid, phase)
        if mode in ("source", "dest"):
            host = "host-a" if mode == "source" else "host-b"
            await fleet.crash(host)
            await fleet.restart(host)
        else:
            first, second = ("host-a", "host-b") if mode == "source-first" else ("host-b", "host-a")
            await fleet.crash("host-a")
            await fleet.crash("host-b")
            await fleet.restart(first)
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
        mig = await _stage(fleet, uuid, phase)
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
        mig = await _stage(fleet, uuid, "queued")
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
