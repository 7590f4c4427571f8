"""Compute RPC 1.2: the conductor hands the agent its BDMs and records the
``compute_run_instance`` event start; capped below 1.2 the agent does both itself. The agent
always reads the security group rules itself, and a rule change made while a build is in
progress reaches its guest."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from indirection_spy import CountingIndirection

from compute_agent.virt.firewall import normalize_rules
from shared_objects.base import indirection_api_in_context
from shared_objects.context import RequestContext
from shared_objects.fields import VMState
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_action_event import InstanceActionEvent
from shared_objects.testing.eventually import eventually

OPS = RequestContext(user_id="ops", project_id="p1")

# The agent's object calls this feature is about, as (object, method).
BDMS = ("BlockDeviceMappingList", "get_by_instance_uuid")
RULES = ("SecurityGroupRuleList", "get_by_instance")
EVENT_START = ("InstanceActionEvent", "event_start")
EVENT_FINISH = ("InstanceActionEvent", "event_finish")
WATCHED = {BDMS, RULES, EVENT_START, EVENT_FINISH}


@pytest.fixture
def counting() -> Callable[[Any], CountingIndirection]:
    """Installs the counter on every agent of a started fleet (the agents go with the fleet)."""

    def install(fleet: Any) -> CountingIndirection:
        counter = CountingIndirection(WATCHED)
        for agent in fleet.agents.values():
            counter.wrap(agent.conductor)
        return counter

    return install


async def _setup(fleet: Any) -> None:
    async with fleet.db() as ctxt:
        await Flavor(ctxt, name="small", vcpus=1, memory_mb=256, root_gb=1).create()
    await fleet.tasks.security_group_create(OPS, name="web")
    await fleet.tasks.security_group_rule_add(
        OPS, group="web", protocol="tcp", from_port=22, to_port=22, cidr="10.0.0.0/8"
    )


async def _settled(fleet: Any, uuids: list[str]) -> Any:
    async with fleet.db() as ctxt:
        insts = list(await InstanceList.get_by_uuids(ctxt, uuids))
    if len(insts) == len(uuids) and all(
        i.vm_state in ("active", "error") and i.task_state is None for i in insts
    ):
        return insts
    return None


async def _run_events(fleet: Any, uuid: str) -> list[dict[str, Any]]:
    async with fleet.db() as ctxt:
        (action,) = await ctxt.db.select("instance_actions", {"instance_uuid": uuid})
        events = await ctxt.db.select("instance_action_events", {"action_id": action["id"]})
    return sorted(
        (e for e in events if e["event"] == "compute_run_instance"), key=lambda e: e["id"]
    )


@pytest.mark.parametrize("cap", [None, "1.2", "1.1", "1.0"])
async def test_run_instance_extras_at_1_2_and_the_old_flow_below(
    fleet_factory: Any, wait_for: Any, counting: Any, cap: str | None
) -> None:
    async with fleet_factory() as fleet:
        await _setup(fleet)
        fleet.compute.set_version_cap(cap)
        calls = counting(fleet)
        (made,) = await fleet.tasks.build_instances(
            OPS,
            flavor="small",
            name="vm",
            forced_host="host-a",
            security_groups=["web"],
            block_device_mappings=[{"volume_id": "vol-1", "device_name": "/dev/vdc"}],
        )
        (inst,) = await wait_for(lambda: _settled(fleet, [made["uuid"]]))
        assert inst.vm_state == "active"

        if cap in (None, "1.2"):
            # Handed over: the agent reads only the rules and finishes the event.
            assert calls.watched() == {RULES: 1, EVENT_FINISH: 1}
        else:
            # An older message: the agent fetches and records as release 1.0 agents do.
            assert calls.watched() == {BDMS: 1, RULES: 1, EVENT_START: 1, EVENT_FINISH: 1}

        # Either way the guest got its volume and firewall, and one attempt was recorded.
        driver = fleet.driver("host-a")
        assert await driver.get_volumes(inst.uuid) == {"vol-1": "/dev/vdc"}
        expected_rules = normalize_rules(
            [
                {
                    "protocol": "tcp",
                    "from_port": 22,
                    "to_port": 22,
                    "cidr": "10.0.0.0/8",
                    "grantee_group_id": None,
                }
            ]
        )
        assert await driver.get_firewall_rules(inst.uuid) == expected_rules
        (event,) = await _run_events(fleet, inst.uuid)
        assert (event["host"], event["result"]) == ("host-a", "Success")
        assert event["start_time"] is not None and event["finish_time"] is not None


@pytest.mark.parametrize("cap", [None, "1.1"])
async def test_rescheduled_build_shows_each_attempt_once(
    fleet_factory: Any, wait_for: Any, counting: Any, cap: str | None
) -> None:
    async with fleet_factory(failures={"host-a": "spawn:*"}) as fleet:
        await _setup(fleet)
        fleet.compute.set_version_cap(cap)
        calls = counting(fleet)
        (made,) = await fleet.tasks.build_instances(
            OPS, flavor="small", name="vm", forced_host=None, security_groups=["web"]
        )
        (inst,) = await wait_for(lambda: _settled(fleet, [made["uuid"]]))
        assert (inst.vm_state, inst.host) == ("active", "host-b")
        events = await _run_events(fleet, inst.uuid)
        assert [(e["host"], e["result"]) for e in events] == [
            ("host-a", "Error"),
            ("host-b", "Success"),
        ]
        assert all(e["finish_time"] is not None for e in events)
        if cap is None:
            # The reschedule's unit of work started host-b's attempt.
            assert calls.watched() == {RULES: 2, EVENT_FINISH: 2}
        else:
            assert calls.watched() == {BDMS: 2, RULES: 2, EVENT_START: 2, EVENT_FINISH: 2}
        assert await fleet.driver("host-b").get_firewall_rules(inst.uuid)


async def test_a_rule_change_during_a_build_reaches_its_guest(
    fleet_factory: Any, wait_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent read the rules, then a rule was added before the guest existed: the refresh
    the conductor casts to the building instance's host is applied once the guest exists."""
    async with fleet_factory() as fleet:
        await _setup(fleet)
        driver = fleet.driver("host-a")
        gate = asyncio.Event()
        real_spawn = driver.spawn

        async def gated_spawn(*args: Any, **kwargs: Any) -> None:
            await gate.wait()  # the rules were read; no guest exists yet
            await real_spawn(*args, **kwargs)

        monkeypatch.setattr(driver, "spawn", gated_spawn)
        # Evidence of the deferred path: the refresh found the build and was held for it.
        watch = fleet.agents["host-a"].security.watch
        held: list[str] = []
        real_note_change = watch.note_change

        def note_change(uuid: str) -> bool:
            deferred = real_note_change(uuid)
            if deferred:
                held.append(uuid)
            return deferred

        monkeypatch.setattr(watch, "note_change", note_change)
        (made,) = await fleet.tasks.build_instances(
            OPS, flavor="small", name="vm", forced_host="host-a", security_groups=["web"]
        )

        async def spawning() -> bool:
            async with fleet.db() as ctxt:
                inst = await Instance.get_by_uuid(ctxt, made["uuid"])
            return inst.task_state == "spawning"

        await wait_for(spawning)
        added = await fleet.tasks.security_group_rule_add(
            OPS, group="web", protocol="tcp", from_port=443, to_port=443, cidr="0.0.0.0/0"
        )
        assert added["refreshed_hosts"] == {"host-a": 1}
        # The refresh reaches the agent while the build waits, and is deferred to the build.
        await eventually(lambda: held == [made["uuid"]], what="the refresh deferred to the build")
        gate.set()
        (inst,) = await wait_for(lambda: _settled(fleet, [made["uuid"]]))
        assert inst.vm_state == "active"
        ports = {r["from_port"] for r in await driver.get_firewall_rules(inst.uuid)}
        assert ports == {22, 443}


async def test_agent_closes_a_started_event_for_a_build_it_skips(fleet_factory: Any) -> None:
    """The conductor started the attempt, but the instance moved on (e.g. deleted) before the
    agent took it: the attempt is closed as an Error, never left looking in progress."""
    async with fleet_factory() as fleet:
        async with fleet.db() as ctxt:
            await Flavor(ctxt, name="small", vcpus=1, memory_mb=256, root_gb=1).create()
            flavor = await Flavor.get_by_name(ctxt, "small")
            inst = Instance(
                ctxt,
                name="gone",
                host="host-a",
                project_id="p1",
                vm_state=VMState.DELETED,
                task_state=None,
                flavor=flavor,
            )
            await inst.create()
            await InstanceAction.action_start(ctxt, inst.uuid, "create")
            await InstanceActionEvent.event_start(ctxt, inst.uuid, "compute_run_instance", "host-a")
        agent_ctxt = RequestContext(request_id=ctxt.request_id, project_id="p1")
        # As host-a's agent: its object calls go out under its own login.
        with indirection_api_in_context(fleet.agents["host-a"].conductor):
            on_agent = await Instance.get_by_uuid(agent_ctxt, inst.uuid)
            await fleet.agents["host-a"].build.run_instance(
                agent_ctxt, on_agent, {}, [], 1, event_started=True
            )
        (event,) = await _run_events(fleet, inst.uuid)
        assert event["result"] == "Error" and event["finish_time"] is not None
        assert "build skipped on host-a" in event["details"]
        async with fleet.db() as ctxt:
            row = await Instance.get_by_uuid(ctxt, inst.uuid)
        assert (row.host, row.vm_state, row.task_state) == ("host-a", VMState.DELETED, None)
        assert not await fleet.driver("host-a").instance_exists(inst.uuid)
