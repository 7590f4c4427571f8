"""Rule changes are never lost to the broker (issue 13): an agent re-applies the database's rules
to its guests at start and after every reconnect, in a constant number of conductor calls."""

from __future__ import annotations

import asyncio
from typing import Any

from indirection_spy import CountingIndirection

from compute_agent.security_groups import ResyncResult
from compute_agent.virt.firewall import FirewallRule, normalize_rules
from shared_objects import releases
from shared_objects.context import RequestContext, admin_context
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.security_group_rule import SecurityGroupRule, SecurityGroupRuleList
from shared_objects.runtime.messaging.memory import MemoryDriver

OPS = RequestContext(user_id="ops", project_id="p1")
BATCHED_READS = {
    ("InstanceList", "get_by_uuids"): 1,
    ("SecurityGroupRuleList", "get_by_security_group_ids"): 1,
}


async def _setup(fleet: Any) -> int:
    async with fleet.db() as ctxt:
        await Flavor(ctxt, name="small", vcpus=1, memory_mb=256, root_gb=1).create()
    group_id: int = await fleet.tasks.security_group_create(OPS, name="web")
    await fleet.tasks.security_group_create(OPS, name="db")
    return group_id


async def _boot(fleet: Any, wait_for: Any, count: int, groups: list[str]) -> list[str]:
    made = await fleet.tasks.build_instances(
        OPS, flavor="small", name="vm", forced_host="host-a", security_groups=groups, count=count
    )
    uuids = [m["uuid"] for m in made]

    async def active() -> bool:
        async with fleet.db() as ctxt:
            insts = list(await InstanceList.get_by_uuids(ctxt, uuids))
        return all(i.vm_state == "active" and i.task_state is None for i in insts)

    await wait_for(active)
    return uuids


async def _db_rules(fleet: Any, uuid: str) -> list[FirewallRule]:
    async with fleet.db() as ctxt:
        rules = await SecurityGroupRuleList.get_by_instance(ctxt, uuid)
    return normalize_rules(
        {
            "protocol": r.protocol,
            "from_port": r.from_port,
            "to_port": r.to_port,
            "cidr": r.cidr,
            "grantee_group_id": r.grantee_group_id,
        }
        for r in rules
    )


async def _resync(fleet: Any, counter: CountingIndirection | None = None) -> ResyncResult:
    agent = fleet.agents["host-a"]
    ctxt = admin_context(releases.BINARY_COMPUTE)
    resync = agent.security.resync(ctxt, agent.calls, "test")
    if counter is not None:
        # Count the resync's own calls only: a build seen ACTIVE may still be closing its
        # action (event and action finish come after the ACTIVE save), and the usage flush
        # and heartbeats run on their own schedule; all share this agent's client.
        return await agent.run_as_agent(counter.only(resync))
    return await agent.run_as_agent(resync)


async def test_a_change_made_while_the_agents_link_is_down_reaches_the_guest_on_reconnect(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory(("host-a",)) as fleet:
        await _setup(fleet)
        (uuid,) = await _boot(fleet, wait_for, 1, ["web"])
        agent = fleet.agents["host-a"]
        link = agent.transport.driver
        assert isinstance(link, MemoryDriver)

        link.simulate_connection_loss()  # a broker restart as the agent sees it
        added = await fleet.tasks.security_group_rule_add(
            OPS, group="web", protocol="tcp", from_port=443, to_port=443, cidr="10.0.0.0/8"
        )
        # The change is committed and the operator is answered; the cast found no queue.
        assert added["refreshed_hosts"] == {"host-a": 1}
        # An absence check, so a fixed wait: a refresh that did reach the agent would be
        # applied within this time.
        await asyncio.sleep(0.2)
        wanted = await _db_rules(fleet, uuid)
        assert wanted and await fleet.driver("host-a").get_firewall_rules(uuid) == []

        await link.simulate_reconnect()

        async def applied() -> bool:
            return await fleet.driver("host-a").get_firewall_rules(uuid) == wanted

        await wait_for(applied, within=5.0)
        await agent.rules_resync.wait_idle()
        assert agent.rules_resync.runs == 2  # start, reconnect


async def test_an_agent_applies_the_databases_rules_to_its_guests_at_start(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory(("host-a",)) as fleet:
        group_id = await _setup(fleet)
        (uuid,) = await _boot(fleet, wait_for, 1, ["web"])
        await fleet.agents["host-a"].stop(grace=5)
        # Committed with no cast at all (as if it had been lost): only the start can catch it.
        async with fleet.db() as ctxt:
            await SecurityGroupRule(
                ctxt,
                parent_group_id=group_id,
                protocol="udp",
                from_port=53,
                to_port=53,
                cidr="192.168.0.0/16",
                grantee_group_id=None,
            ).create()

        agent = await fleet.restart_agent("host-a")
        await agent.rules_resync.wait_idle()

        wanted = await _db_rules(fleet, uuid)
        assert wanted and await fleet.driver("host-a").get_firewall_rules(uuid) == wanted


async def test_a_resync_costs_the_same_two_calls_for_one_guest_or_many(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory(("host-a",)) as fleet:
        await _setup(fleet)
        await fleet.tasks.security_group_rule_add(
            OPS, group="web", protocol="tcp", from_port=80, to_port=80, cidr="0.0.0.0/0"
        )
        await fleet.tasks.security_group_rule_add(
            OPS, group="db", protocol="tcp", from_port=5432, to_port=5432, cidr="10.0.0.0/8"
        )
        (first,) = await _boot(fleet, wait_for, 1, ["web"])
        await fleet.agents["host-a"].rules_resync.wait_idle()

        counter = CountingIndirection()
        counter.wrap(fleet.agents["host-a"].conductor)
        one = await _resync(fleet, counter)
        assert counter.watched() == BATCHED_READS
        assert (one.checked, one.changed) == (1, 0)  # already right: left alone

        more = await _boot(fleet, wait_for, 3, ["web", "db"])
        # One guest drifted (its rules wiped behind the agent's back).
        async with fleet.db() as ctxt:
            drifted = await Instance.get_by_uuid(ctxt, more[0])
        await fleet.driver("host-a").refresh_instance_security_rules(drifted, [])

        counter.calls.clear()
        many = await _resync(fleet, counter)
        assert counter.watched() == BATCHED_READS
        assert (many.checked, many.changed, many.failed) == (4, 1, 0)
        for uuid in [first, *more]:
            assert await fleet.driver("host-a").get_firewall_rules(uuid) == await _db_rules(
                fleet, uuid
            )
