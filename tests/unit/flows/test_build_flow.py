from __future__ import annotations

from typing import Any

import pytest

from shared_objects import exception
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import InstanceList
from shared_objects.objects.instance_fault import InstanceFault


async def _flavor(fleet: Any, name: str = "small", vcpus: int = 1, ram: int = 512) -> None:
    async with fleet.db() as ctxt:
        await Flavor(ctxt, name=name, vcpus=vcpus, memory_mb=ram, root_gb=1).create()


async def _instances(fleet: Any, uuids: list[str]) -> Any:
    async with fleet.db() as ctxt:
        return list(await InstanceList.get_by_uuids(ctxt, uuids))


async def _settled(fleet: Any, uuids: list[str]) -> Any:
    insts = await _instances(fleet, uuids)
    if all(i.vm_state in ("active", "error") and i.task_state is None for i in insts):
        return insts
    return None


async def test_boot_spreads_over_hosts_and_usage_matches(fleet_factory: Any, wait_for: Any) -> None:
    async with fleet_factory() as fleet:
        await _flavor(fleet)
        ctxt = fleet.agents["host-a"]._context  # noqa: F841 - agents exist
        from shared_objects.context import RequestContext

        made = await fleet.tasks.build_instances(
            RequestContext(project_id="p1"), flavor="small", name="vm", count=6
        )
        insts = await wait_for(lambda: _settled(fleet, [m["uuid"] for m in made]))
        assert {i.vm_state for i in insts} == {"active"}
        by_host: dict[str, int] = {}
        for inst in insts:
            by_host[inst.host] = by_host.get(inst.host, 0) + 1
        assert by_host == {"host-a": 3, "host-b": 3}
        for host in ("host-a", "host-b"):
            agent = fleet.agents[host]
            await agent.run_as_agent(agent.tracker.flush())
        async with fleet.db() as dctxt:
            nodes = {n.host: n for n in await ComputeNodeList.get_all(dctxt)}
        for host, count in by_host.items():
            assert nodes[host].memory_mb_used == 512 * count
            assert nodes[host].vcpus_used == count
            assert set(await fleet.driver(host).list_instance_uuids()) == {
                i.uuid for i in insts if i.host == host
            }


async def test_spawn_failure_reschedules_to_other_host(fleet_factory: Any, wait_for: Any) -> None:
    from shared_objects.context import RequestContext

    async with fleet_factory(failures={"host-a": "spawn:*"}) as fleet:
        await _flavor(fleet)
        made = await fleet.tasks.build_instances(
            RequestContext(project_id="p1"), flavor="small", name="vm", forced_host=None
        )
        (inst,) = await wait_for(lambda: _settled(fleet, [made[0]["uuid"]]))
        assert inst.vm_state == "active"
        assert inst.host == "host-b"
        async with fleet.db() as ctxt:
            (action,) = await ctxt.db.select("instance_actions", {"instance_uuid": inst.uuid})
            events = await ctxt.db.select("instance_action_events", {"action_id": action["id"]})
        attempts = sorted((e["host"], e["result"]) for e in events)
        assert attempts == [("host-a", "Error"), ("host-b", "Success")]
        assert set(await fleet.driver("host-a").list_instance_uuids()) == set()
        assert not fleet.agents["host-a"].tracker.holds(inst.uuid)


async def test_failure_everywhere_ends_in_error_with_fault(
    fleet_factory: Any, wait_for: Any
) -> None:
    from shared_objects.context import RequestContext

    async with fleet_factory(failures={"host-a": "spawn:*", "host-b": "spawn:*"}) as fleet:
        await _flavor(fleet)
        made = await fleet.tasks.build_instances(
            RequestContext(project_id="p1"), flavor="small", name="vm"
        )
        (inst,) = await wait_for(lambda: _settled(fleet, [made[0]["uuid"]]))
        assert inst.vm_state == "error"
        async with fleet.db() as ctxt:
            fault = await InstanceFault.get_latest_for_instance(ctxt, inst.uuid)
        assert "No valid host" in (fault.message or "") or "build attempts" in (fault.message or "")


async def test_no_capacity_is_error_with_no_valid_host_fault(
    fleet_factory: Any, wait_for: Any
) -> None:
    from shared_objects.context import RequestContext

    async with fleet_factory() as fleet:
        await _flavor(fleet, "huge", vcpus=1, ram=10**6)
        made = await fleet.tasks.build_instances(
            RequestContext(project_id="p1"), flavor="huge", name="vm"
        )
        (inst,) = await _instances(fleet, [made[0]["uuid"]])
        assert inst.vm_state == "error"
        async with fleet.db() as ctxt:
            fault = await InstanceFault.get_latest_for_instance(ctxt, inst.uuid)
        assert "No valid host" in (fault.message or "")
        assert "not enough RAM" in (fault.message or "")


@pytest.mark.parametrize(
    ("request_kwargs", "error"),
    [
        ({"flavor": "nope", "name": "x"}, exception.FlavorNotFound),
        ({"flavor": "small", "name": "x", "count": 0}, exception.InvalidRequest),
        ({"flavor": "small", "name": "x", "count": -3}, exception.InvalidRequest),
        ({"flavor": "small", "name": "x", "forced_host": "ghost"}, exception.InvalidRequest),
        ({"flavor": "small", "name": ""}, exception.InvalidRequest),
    ],
)
async def test_bad_build_requests_change_nothing(
    fleet_factory: Any, request_kwargs: dict[str, Any], error: type[Exception]
) -> None:
    from shared_objects.context import RequestContext

    async with fleet_factory() as fleet:
        await _flavor(fleet)
        with pytest.raises(error):
            await fleet.tasks.build_instances(RequestContext(project_id="p1"), **request_kwargs)
        async with fleet.db() as ctxt:
            assert len(await InstanceList.get_by_host(ctxt, "host-a")) == 0
            rows = await ctxt.db.select("instances", {"deleted": False})
            assert rows == []
