"""An agent that comes back after the conductor's reconciler acted on its work (issue 13).

The host's agent stops (its service is marked down), the rows are put where they were when it
died, the real reconciler runs one pass (bounds at zero), then the agent starts again: its
``init_host`` removes the guests the rows no longer want and claims nothing for them.
"""

from __future__ import annotations

import uuid as uuidlib
from types import SimpleNamespace
from typing import Any

import pytest
from live_migration_helpers import boot, stage_crash

from compute_agent.virt.migration_model import MigrationModel
from conductor.reconcile import Bounds, Reconciler
from conductor.tasks.build import BuildTask
from conductor.tasks.build_placement import BuildSettings
from conductor.testing.reconcile import FakeCompute
from shared_objects.context import RequestContext
from shared_objects.fields import TaskState
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.migration import Migration

NOW = Bounds(
    service_down_time=60.0,
    build_recast_after=3600.0,
    build_reschedule_after=3600.0,
    unassigned_build_after=3600.0,
    build_host_down_after=0.0,
    delete_host_down_after=0.0,
    migration_hosts_down_after=0.0,
    action_settle_after=3600.0,
)


async def _boot(fleet: Any, host: str) -> str:
    async with fleet.db() as ctxt:
        await Flavor(ctxt, name="small", vcpus=1, memory_mb=512, root_gb=1).create()
    made = await fleet.tasks.build_instances(
        RequestContext(project_id="p1"), flavor="small", name="vm", forced_host=host
    )
    return str(made[0]["uuid"])


async def _active(fleet: Any, uuid: str) -> Any:
    async with fleet.db() as ctxt:
        (inst,) = await InstanceList.get_by_uuids(ctxt, [uuid])
    return inst if inst.vm_state == "active" and inst.task_state is None else None


async def _set(fleet: Any, uuid: str, **values: Any) -> None:
    """Put the row where a crash left it (as the conductor's database would have it)."""
    async with fleet.db() as ctxt:
        await ctxt.db.update("instances", {"uuid": uuid}, values, returning=())


async def _reconcile(fleet: Any) -> Any:
    # The in-process fleet's client of the agents (a moved build is cast for real); the
    # live-migration fleet has none and needs none (no build is moved there).
    compute = getattr(fleet, "compute", None) or FakeCompute()
    build = BuildTask(fleet.database, compute, BuildSettings(service_down_time=60.0))
    reconciler = Reconciler(fleet.database, build, NOW, interval=0, trust_after=0)
    return await reconciler.run_pass()


async def _row(fleet: Any, uuid: str) -> Instance:
    async with fleet.db() as ctxt:
        return await Instance.get_by_uuid(ctxt, uuid)


async def _memory_used(fleet: Any, host: str) -> int:
    agent = fleet.agents[host]
    await agent.run_as_agent(agent.tracker.flush())
    async with fleet.db() as ctxt:
        (node,) = await ComputeNodeList.get_all_by_host(ctxt, host)
    return int(node.memory_mb_used)


async def _down_with_guest(fleet: Any, wait_for: Any) -> str:
    """An ACTIVE instance on host-a whose agent then stops, guest left in the hypervisor."""
    uuid = await _boot(fleet, "host-a")
    await wait_for(lambda: _active(fleet, uuid))
    await fleet.agents["host-a"].stop(grace=5)
    assert await fleet.driver("host-a").list_instance_uuids() == [uuid]
    return uuid


async def test_returning_agent_removes_the_guest_of_a_build_the_reconciler_failed(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        uuid = await _down_with_guest(fleet, wait_for)
        # It died spawning: the guest exists, the row never saw ACTIVE.
        await _set(fleet, uuid, vm_state="building", task_state="spawning", launched_at=None)
        await _reconcile(fleet)
        row = await _row(fleet, uuid)
        assert (row.vm_state, row.task_state, row.host) == ("error", None, "host-a")
        await fleet.restart_agent("host-a")
        assert await fleet.driver("host-a").list_instance_uuids() == []
        row = await _row(fleet, uuid)
        assert (row.vm_state, row.host, row.launched_at) == ("error", "host-a", None)
        assert await _memory_used(fleet, "host-a") == 0


async def test_returning_agent_keeps_the_guest_of_an_error_instance_that_had_launched(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        uuid = await _down_with_guest(fleet, wait_for)
        # ERROR after it ran (e.g. a lost migration): the guest holds the user's work.
        await _set(fleet, uuid, vm_state="error")
        await fleet.restart_agent("host-a")
        assert await fleet.driver("host-a").list_instance_uuids() == [uuid]


async def test_returning_agent_reaps_the_guest_of_an_instance_the_reconciler_deleted(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        uuid = await _down_with_guest(fleet, wait_for)
        await _set(fleet, uuid, task_state=TaskState.DELETING)
        await _reconcile(fleet)
        row = await _row(fleet, uuid)
        assert row.deleted and row.host == "host-a"
        await fleet.restart_agent("host-a")
        assert await fleet.driver("host-a").list_instance_uuids() == []
        assert await _memory_used(fleet, "host-a") == 0


async def test_returning_agent_removes_the_guest_of_a_build_moved_to_another_host(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        uuid = await _down_with_guest(fleet, wait_for)
        # A handed-back attempt whose guest survived, then the build was placed on host-b.
        await _set(fleet, uuid, vm_state="building", task_state="scheduling", launched_at=None)
        await _reconcile(fleet)
        await wait_for(lambda: _active(fleet, uuid))
        assert (await _row(fleet, uuid)).host == "host-b"
        await fleet.restart_agent("host-a")
        assert await fleet.driver("host-a").list_instance_uuids() == []
        assert await fleet.driver("host-b").list_instance_uuids() == [uuid]
        assert await _memory_used(fleet, "host-a") == 0


async def test_returning_agent_leaves_a_guest_no_row_knows(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        uuid = await _down_with_guest(fleet, wait_for)
        stray = SimpleNamespace(uuid=str(uuidlib.uuid4()), vcpus=1, memory_mb=256, root_gb=1)
        await fleet.driver("host-a").spawn(stray, "fake-image")
        await fleet.driver("host-a").cleanup_host()
        await fleet.restart_agent("host-a")
        # Never wipe on absence: an empty or restored database must not empty a host.
        assert sorted(await fleet.driver("host-a").list_instance_uuids()) == sorted(
            [uuid, stray.uuid]
        )


# --- live migrations the reconciler settled while both hosts were down ---------------------

FAST = MigrationModel(bandwidth_mb_s=4000, round_interval_s=0.01)


async def _both_down_and_reconciled(fleet: Any, uuid: str, phase: str) -> None:
    """Crash both hosts of a host-a -> host-b migration in ``phase``; the reconciler (host-c
    still up) settles it."""
    await fleet.crash("host-a")
    await fleet.crash("host-b")
    async with fleet.db() as ctxt:
        for host in ("host-a", "host-b"):
            await ctxt.db.update("services", {"host": host}, {"last_seen_up": None}, returning=())
    await _reconcile(fleet)


async def _guests(fleet: Any, uuid: str) -> dict[str, str]:
    """Host -> phase of the guest, on every live agent that has it."""
    out: dict[str, str] = {}
    for host in fleet.agents:
        driver = fleet.driver(host)
        if await driver.instance_exists(uuid):
            out[host] = (await driver.get_info(uuid)).phase.value
    return out


async def _settled_guests(fleet: Any, uuid: str) -> Any:
    pending = any(a.live_migration.resolver.pending for a in fleet.agents.values())
    guests = await _guests(fleet, uuid)
    return None if pending or len(guests) != 1 else guests


@pytest.mark.parametrize("first", ["host-a", "host-b"])
@pytest.mark.parametrize(
    ("phase", "status", "vm_state"),
    [("prepared", "failed", "active"), ("switched", "error", "error")],
)
async def test_returning_hosts_keep_only_the_copy_on_the_host_the_reconciler_left(
    lm_fleet_factory: Any, wait_for: Any, phase: str, status: str, vm_state: str, first: str
) -> None:
    async with lm_fleet_factory(hosts=("host-a", "host-b", "host-c"), migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await stage_crash(fleet, uuid, phase)
        await _both_down_and_reconciled(fleet, uuid, phase)
        async with fleet.db() as ctxt:
            row = await Instance.get_by_uuid(ctxt, uuid)
            assert (await Migration.get_by_uuid(ctxt, mig)).status == status
        assert (row.host, row.vm_state, row.task_state) == ("host-a", vm_state, None)
        second = "host-b" if first == "host-a" else "host-a"
        await fleet.restart(first)
        await fleet.restart(second)
        guests = await wait_for(lambda: _settled_guests(fleet, uuid), within=20)
        # The row still points at host-a, which runs the only copy left.
        assert guests == {"host-a": "running"}
        row = await _row(fleet, uuid)
        assert (row.host, row.vm_state, row.task_state) == ("host-a", vm_state, None)
        await fleet.flush()
        assert uuid not in fleet.agents["host-b"].tracker.claims.claimed_uuids
        assert await _memory_used(fleet, "host-b") == 0


async def test_returning_hosts_keep_every_copy_when_the_row_host_has_none(
    lm_fleet_factory: Any, wait_for: Any
) -> None:
    async with lm_fleet_factory(hosts=("host-a", "host-b", "host-c"), migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        await stage_crash(fleet, uuid, "switched")
        await _both_down_and_reconciled(fleet, uuid, "switched")
        # The copy on host-a (the row's host) is lost with its disk.
        await fleet.crashed["host-a"].driver.destroy(await _row(fleet, uuid))
        await fleet.restart("host-a")
        await fleet.restart("host-b")

        async def settled() -> bool:
            return not any(a.live_migration.resolver.pending for a in fleet.agents.values())

        await wait_for(settled)
        # The incoming copy on host-b may be the last one: an operator decides, nothing is
        # destroyed on a guess.
        assert await _guests(fleet, uuid) == {"host-b": "incoming"}
        row = await _row(fleet, uuid)
        assert (row.host, row.vm_state) == ("host-a", "error")
