"""Helpers shared by the live-migration flow tests (boot, migrate, wait, invariants)."""

from __future__ import annotations

import asyncio
from typing import Any

from compute_agent.testing_invariants import assert_fleet_invariants, driver_views
from shared_objects.context import RequestContext
from shared_objects.fields import MigrationStatus, TaskState
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.migration import Migration
from shared_objects.testing.eventually import eventually

FINISHED = {"completed", "failed", "error", "cancelled"}


def user() -> RequestContext:
    return RequestContext(user_id="u1", project_id="p1")


async def boot(fleet: Any, host: str, count: int = 1, ram: int = 512) -> list[str]:
    """``count`` ACTIVE instances on ``host``."""
    async with fleet.db() as ctxt:
        try:
            await Flavor.get_by_name(ctxt, f"lm{ram}")
        except Exception:
            await Flavor(ctxt, name=f"lm{ram}", vcpus=1, memory_mb=ram, root_gb=1).create()
    made = await fleet.tasks.build_instances(
        user(), flavor=f"lm{ram}", name="vm", count=count, forced_host=host
    )
    uuids = [m["uuid"] for m in made]

    async def active() -> list[Instance]:
        async with fleet.db() as ctxt:
            insts = list(await InstanceList.get_by_uuids(ctxt, uuids))
        states = [(i.vm_state, i.task_state) for i in insts]
        assert states == [("active", None)] * len(uuids), states
        return insts

    insts = await eventually(active, 15)
    assert {i.host for i in insts} == {host}
    return uuids


async def instance(fleet: Any, uuid: str) -> Instance:
    async with fleet.db() as ctxt:
        return await Instance.get_by_uuid(ctxt, uuid)


async def latest_fault(fleet: Any, uuid: str) -> str:
    async with fleet.db() as ctxt:
        fault = await InstanceFault.get_latest_for_instance(ctxt, uuid)
    return fault.message or ""


async def wait_migration(
    fleet: Any, migration_uuid: str, within: float = 20.0, statuses: set[str] | None = None
) -> dict[str, Any]:
    """Poll ``get_migration`` (as the CLI does) until it reaches one of ``statuses``."""
    want = statuses or FINISHED

    async def reached() -> dict[str, Any]:
        got = await fleet.tasks.get_migration(user(), migration_uuid=migration_uuid)
        assert got["status"] in want, f"migration stuck in {got['status']}"
        return dict(got)

    return await eventually(reached, within, interval=0.02)


async def settle_task(fleet: Any, migration_uuid: str) -> None:
    """Let the conductor's task for the migration end (it learns the outcome)."""
    await asyncio.wait_for(fleet.endpoint.live_migration.wait(migration_uuid), 30)


async def wait_idle(fleet: Any, uuid: str, within: float = 20.0) -> Instance:
    async def idle() -> Instance:
        inst = await instance(fleet, uuid)
        assert inst.task_state is None, f"instance stuck in {inst.task_state}"
        return inst

    return await eventually(idle, within)


async def check_invariants(fleet: Any) -> None:
    """The fleet invariants, including each live agent's claims."""
    await fleet.flush()
    drivers = {h: a.driver for h, a in fleet.agents.items()}
    claims = {h: a.tracker.claims.claimed_uuids for h, a in fleet.agents.items()}
    async with fleet.db() as ctxt:
        await assert_fleet_invariants(ctxt, await driver_views(drivers), claims=claims)


async def events(fleet: Any, uuid: str) -> list[tuple[str, str | None, str | None]]:
    """(event, host, result) of the instance's ``live-migration`` actions."""
    async with fleet.db() as ctxt:
        actions = await ctxt.db.select(
            "instance_actions", {"instance_uuid": uuid, "action": "live-migration"}
        )
        out: list[tuple[str, str | None, str | None]] = []
        for action in actions:
            for e in await ctxt.db.select("instance_action_events", {"action_id": action["id"]}):
                out.append((e["event"], e["host"], e["result"]))
    return out


_STATUS = {
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
# Phases in which the destination holds something a restart of it must settle.
DEST_INVOLVED = {"prepared", "running", "switched", "post", "post-resumed", "post-moved"}


async def stage_crash(fleet: Any, uuid: str, phase: str) -> str:
    """Leave the fleet as a crash of a host-a -> host-b migration in ``phase`` would."""
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
            status=_STATUS[phase],
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
