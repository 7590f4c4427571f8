"""Issue 13: a security-group rule change is never lost to a broker restart or crash.

The change is committed while the private broker node is down (a restart, or a crash and
revival): its ``refresh_instance_security_rules`` cast to the agent can only be lost (the agent's
non-durable queue goes with the broker, and the cast has no broker to go to anyway). After the
broker returns, the agent's reconnect resync must bring every guest's firewall (read from the
fake hypervisor's state file, outside the agent process) to the database's rules within a few
seconds. Before the fix the guests kept the old rules until the next change.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from compute_agent.virt._guest import GuestRecord
from compute_agent.virt.firewall import FirewallRule, normalize_rules
from conductor.db.session import Database
from conductor.tools.cluster import LocalCluster
from shared_objects.context import RequestContext
from shared_objects.objects.security_group_rule import SecurityGroupRule, SecurityGroupRuleList
from shared_objects.testing import RabbitNode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HOST = "compute-1"
# The agent reconnects every second once the broker answers; its resync is two conductor calls.
WITHIN = 20.0


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


@pytest.fixture
async def cluster(node: RabbitNode, cluster_factory: Any) -> AsyncIterator[LocalCluster]:
    async with cluster_factory(
        node=node,
        hosts=(HOST,),
        common_env={"FLEET_COMPUTE__SPAWN_DELAY": "0.05"},
        check_exits=False,
    ) as local:
        yield local


def _read_guest_rules(state_file: Path) -> dict[str, list[FirewallRule]]:
    document = json.loads(state_file.read_text(encoding="utf-8"))
    guests = (GuestRecord.from_json(g) for g in dict(document["guests"]).values())
    return {g.uuid: g.rules for g in guests}


async def _guest_rules(cluster: LocalCluster) -> dict[str, list[FirewallRule]]:
    state_file = cluster.workdir / "hypervisors" / f"{HOST}.json"
    return await asyncio.to_thread(_read_guest_rules, state_file)


async def _db_rules(database: Database, uuids: list[str]) -> dict[str, list[FirewallRule]]:
    ctxt = RequestContext(user_id="test", project_id="admin", is_admin=True)
    out: dict[str, list[FirewallRule]] = {}
    async with database.request(ctxt):
        for uuid in uuids:
            rules = await SecurityGroupRuleList.get_by_instance(ctxt, uuid)
            out[uuid] = normalize_rules(
                {
                    "protocol": r.protocol,
                    "from_port": r.from_port,
                    "to_port": r.to_port,
                    "cidr": r.cidr,
                    "grantee_group_id": r.grantee_group_id,
                }
                for r in rules
            )
    return out


async def _until_equal(cluster: LocalCluster, wanted: dict[str, list[FirewallRule]]) -> float:
    started = time.monotonic()
    seen: dict[str, list[FirewallRule]] = {}
    while time.monotonic() - started < WITHIN:
        seen = {u: r for u, r in (await _guest_rules(cluster)).items() if u in wanted}
        if seen == wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"guest rules {seen} != database rules {wanted} after {WITHIN} s")


@pytest.mark.parametrize("fault", ["restart", "kill"])
async def test_a_rule_change_during_a_broker_outage_reaches_the_guests(
    cluster: LocalCluster, node: RabbitNode, pg_database_url: str, fault: str
) -> None:
    assert cluster.tasks is not None
    group_id = await cluster.tasks.security_group_create(cluster.ctxt, name="web")
    await cluster.tasks.security_group_rule_add(
        cluster.ctxt, group="web", protocol="tcp", from_port=22, to_port=22, cidr="10.0.0.0/8"
    )
    uuids = await cluster.boot(flavor="small", name="vm", count=2, security_groups=["web"])
    assert {i.vm_state for i in await cluster.wait_instances(uuids)} == {"active"}
    database = Database(pg_database_url)
    try:
        before = await _db_rules(database, uuids)
        await _until_equal(cluster, before)

        if fault == "restart":
            await node.stop_app()
        else:
            await node.kill()
        # Committed while the broker is gone: whatever cast would follow can only be lost.
        ctxt = RequestContext(user_id="test", project_id="admin", is_admin=True)
        async with database.request(ctxt):
            await SecurityGroupRule(
                ctxt,
                parent_group_id=group_id,
                protocol="tcp",
                from_port=443,
                to_port=443,
                cidr="0.0.0.0/0",
                grantee_group_id=None,
            ).create()
        wanted = await _db_rules(database, uuids)
        assert wanted != before
        if fault == "restart":
            await node.start_app()
        else:
            await node.revive()

        took = await _until_equal(cluster, wanted)
        print(f"\n{fault}: guests have the database's rules {took:.1f} s after the broker returned")
    finally:
        await database.dispose()
