"""Agent flows through a database outage, and a graceful stop (issue 13, deliver 1 and 3).

The conductor's database goes down while a build is in flight (``DatabaseOutage``): the agent's
calls fail with ``DatabaseUnavailable`` and are retried, so the build still ends ACTIVE. When the
outage outlasts the agent's retry bound, the guest is removed and the build is handed back once
the database returns. A stopping agent marks its service down at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from compute_agent.transient import Retrier, RetryPolicy
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import TaskState
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.service import Service
from shared_objects.runtime.messaging import MessagingTimeout


async def _flavor(fleet: Any) -> None:
    async with fleet.db() as ctxt:
        await Flavor(ctxt, name="small", vcpus=1, memory_mb=512, root_gb=1).create()


async def _settled(fleet: Any, uuids: list[str]) -> Any:
    try:
        async with fleet.db() as ctxt:
            insts = list(await InstanceList.get_by_uuids(ctxt, uuids))
    except ConnectionRefusedError:  # the test's own reads while the outage lasts
        return None
    if all(i.vm_state in ("active", "error") and i.task_state is None for i in insts):
        return insts
    return None


def _outage_during_spawn(fleet: Any, host: str, seconds: float) -> Any:
    """Take the database down the moment ``host`` starts spawning, for ``seconds``."""
    outage = fleet.database_outage()
    driver = fleet.driver(host)
    spawn = driver.spawn

    async def spawn_then_outage(*args: Any, **kwargs: Any) -> Any:
        outage.for_seconds(seconds)
        return await spawn(*args, **kwargs)

    driver.spawn = spawn_then_outage
    return outage


async def _boot(fleet: Any, host: str) -> str:
    made = await fleet.tasks.build_instances(
        RequestContext(project_id="p1"), flavor="small", name="vm", forced_host=host
    )
    return str(made[0]["uuid"])


async def test_build_rides_out_a_database_outage_and_ends_active(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        agent = fleet.agents["host-a"]
        agent.build.calls = Retrier(RetryPolicy(total=30.0, initial=0.1, maximum=0.4))
        outage = _outage_during_spawn(fleet, "host-a", 1.5)
        uuid = await _boot(fleet, "host-a")
        (inst,) = await wait_for(lambda: _settled(fleet, [uuid]), within=20)
        assert inst.vm_state == "active" and inst.host == "host-a"
        assert outage.refused > 0
        assert agent.build.calls.retries > 0
        assert await fleet.driver("host-a").list_instance_uuids() == [uuid]


async def test_outage_past_the_bound_removes_the_guest_and_hands_the_build_back(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        agent = fleet.agents["host-a"]
        agent.build.calls = Retrier(RetryPolicy(total=0.5, initial=0.1, maximum=0.2))
        _outage_during_spawn(fleet, "host-a", 2.0)
        uuid = await _boot(fleet, "host-a")

        async def guest_gone() -> bool:
            return not await fleet.driver("host-a").list_instance_uuids()

        # Past the bound, while the database is still down: no guest runs that the database
        # does not show, and the claim is released.
        await wait_for(guest_gone, within=5)
        assert not agent.tracker.holds(uuid)
        # Once it is back, the hand-back lands and the conductor places the build elsewhere.
        (inst,) = await wait_for(lambda: _settled(fleet, [uuid]), within=20)
        if inst.vm_state == "error":
            async with fleet.db() as ctxt:
                assert await InstanceFault.get_latest_for_instance(ctxt, uuid)
        else:
            assert inst.vm_state == "active" and inst.host == "host-b"
        assert not agent.build._background


async def test_duplicate_run_instance_is_skipped_while_the_first_is_in_progress(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        agent = fleet.agents["host-a"]
        driver = fleet.driver("host-a")
        spawns = 0
        spawn = driver.spawn
        gate = asyncio.Event()

        async def slow_spawn(*args: Any, **kwargs: Any) -> Any:
            nonlocal spawns
            spawns += 1
            await gate.wait()
            return await spawn(*args, **kwargs)

        driver.spawn = slow_spawn
        uuid = await _boot(fleet, "host-a")

        async def spawning() -> bool:
            return spawns == 1

        await wait_for(spawning)
        # A re-cast of the same build (the conductor's reconciler) arrives meanwhile.
        async with fleet.db() as ctxt:
            copy = await Instance.get_by_uuid(ctxt, uuid)
        ctxt = RequestContext(project_id="p1")
        await agent.run_as_agent(agent.build.run_instance(ctxt, copy, {}, [], 1))
        gate.set()
        (inst,) = await wait_for(lambda: _settled(fleet, [uuid]))
        assert inst.vm_state == "active"
        assert spawns == 1


async def test_stopping_agent_marks_its_service_down_and_start_marks_it_up(
    fleet_factory: Any,
) -> None:
    async with fleet_factory() as fleet:
        agent = fleet.agents["host-a"]
        await agent.stop(grace=5)
        async with fleet.db() as ctxt:
            service = await Service.get_by_host_and_binary(ctxt, "host-a", "fleet-compute")
            other = await Service.get_by_host_and_binary(ctxt, "host-b", "fleet-compute")
        assert service.last_seen_up is None and not service.is_up
        assert other.is_up
        await fleet.restart_agent("host-a")
        async with fleet.db() as ctxt:
            service = await Service.get_by_host_and_binary(ctxt, "host-a", "fleet-compute")
        assert service.is_up


async def test_restart_leaves_scheduling_rows_alone_and_removes_a_leftover_guest(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        uuid = await _boot(fleet, "host-a")
        await wait_for(lambda: _settled(fleet, [uuid]))
        agent = fleet.agents["host-a"]
        await agent.stop(grace=5)
        # As if the build had been handed back without its guest removed (a crash between
        # the two): the row waits to be scheduled, the hypervisor still has the guest.
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
            inst.vm_state = "building"
            inst.task_state = TaskState.SCHEDULING
            await inst.save()
        assert await fleet.driver("host-a").list_instance_uuids() == [uuid]
        await fleet.restart_agent("host-a")
        assert await fleet.driver("host-a").list_instance_uuids() == []
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
        assert (inst.vm_state, inst.task_state, inst.host) == ("building", "scheduling", "host-a")


async def test_recast_of_a_finished_build_changes_nothing(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        uuid = await _boot(fleet, "host-a")
        (before,) = await wait_for(lambda: _settled(fleet, [uuid]))
        agent = fleet.agents["host-a"]
        # The conductor's reconciler re-casts (or the broker redelivers) the same build.
        async with fleet.db() as ctxt:
            stale = await Instance.get_by_uuid(ctxt, uuid)
        stale.task_state = TaskState.SCHEDULING
        stale.obj_reset_changes()
        ctxt = RequestContext(project_id="p1")
        await agent.run_as_agent(agent.build.run_instance(ctxt, stale, {}, [], 1))
        async with fleet.db() as dctxt:
            after = await Instance.get_by_uuid(dctxt, uuid)
        assert (after.vm_state, after.task_state, after.host) == ("active", None, "host-a")
        assert after.updated_at == before.updated_at
        assert await fleet.driver("host-a").list_instance_uuids() == [uuid]
        assert agent.tracker.holds(uuid)


async def test_stale_cast_of_a_build_moved_to_another_host_is_skipped(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        uuid = await _boot(fleet, "host-b")
        await wait_for(lambda: _settled(fleet, [uuid]))
        # As if host-a had been stopped with this build queued, and the conductor had
        # rescheduled it to host-b meanwhile: host-a's queued cast arrives after its restart.
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
            inst.vm_state = "building"
            inst.task_state = TaskState.SCHEDULING
            await inst.save()
        agent = fleet.agents["host-a"]
        ctxt = RequestContext(project_id="p1")
        await agent.run_as_agent(agent.build.run_instance(ctxt, inst, {}, [], 1))
        async with fleet.db() as dctxt:
            after = await Instance.get_by_uuid(dctxt, uuid)
        assert (after.task_state, after.host) == ("scheduling", "host-b")
        assert await fleet.driver("host-a").list_instance_uuids() == []
        assert not agent.tracker.holds(uuid)


async def test_a_lost_reply_to_a_landed_save_is_taken_as_done_not_as_a_conflict(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        agent = fleet.agents["host-a"]
        agent.build.calls = Retrier(RetryPolicy(total=30.0, initial=0.05, maximum=0.1))
        conductor = agent.conductor
        real = conductor.object_action
        lost: list[str] = []

        async def reply_lost_once(context: Any, objinst: Any, objmethod: str, *a: Any) -> Any:
            result = await real(context, objinst, objmethod, *a)
            if objmethod == "save" and objinst.obj_name() == "Instance" and not lost:
                if objinst.task_state == TaskState.SPAWNING:
                    # The conductor committed the save; its reply never came back.
                    lost.append(objinst.uuid)
                    raise MessagingTimeout("Timed out waiting for a reply")
            return result

        conductor.object_action = reply_lost_once
        uuid = await _boot(fleet, "host-a")
        (inst,) = await wait_for(lambda: _settled(fleet, [uuid]))
        assert lost == [uuid]
        # The retry found the row already spawning (its own write) and went on: no hand-back.
        assert (inst.vm_state, inst.host) == ("active", "host-a")
        assert agent.build.calls.retries == 1


async def test_an_unrecordable_event_after_the_build_is_active_keeps_the_guest(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        agent = fleet.agents["host-a"]
        agent.build.calls = Retrier(RetryPolicy(total=0.3, initial=0.05, maximum=0.1))
        conductor = agent.conductor
        real = conductor.object_class_action_versions
        refused: list[str] = []

        async def no_event_finish(context: Any, objname: str, objmethod: str, *a: Any) -> Any:
            if (objname, objmethod) == ("InstanceActionEvent", "event_finish"):
                refused.append(objmethod)
                raise exception.DatabaseUnavailable(reason="down for event_finish only")
            return await real(context, objname, objmethod, *a)

        conductor.object_class_action_versions = no_event_finish
        uuid = await _boot(fleet, "host-a")
        await wait_for(lambda: _settled(fleet, [uuid]))
        # ACTIVE is saved before the event's finish: wait until the agent's build handler is
        # over (the finish's retries ran out), then nothing may have been undone.
        await wait_for(lambda: uuid not in agent.build._building)
        assert len(refused) > 1, refused  # the finish was retried before the agent gave up
        (inst,) = await wait_for(lambda: _settled(fleet, [uuid]))
        assert (inst.vm_state, inst.host) == ("active", "host-a")
        assert await fleet.driver("host-a").list_instance_uuids() == [uuid]
        assert agent.tracker.holds(uuid)
