"""run_instance end to end across processes (issue 4 acceptance a, b, e, f)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.instance import InstanceList
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.testing.eventually import eventually

pytestmark = pytest.mark.integration


async def _usage_matches(cluster: Any, hosts: tuple[str, ...]) -> dict[str, dict[str, int]]:
    insts = [i for i in await InstanceList.get_all(cluster.ctxt) if i.vm_state == "active"]
    nodes = {n.host: n for n in await ComputeNodeList.get_all(cluster.ctxt)}
    report: dict[str, dict[str, int]] = {}
    for host in hosts:
        mine = [i for i in insts if i.host == host]
        node = nodes[host]
        report[host] = {"instances": len(mine), "memory_mb_used": node.memory_mb_used}
        assert node.memory_mb_used == sum(i.memory_mb for i in mine)
        assert node.vcpus_used == sum(i.vcpus for i in mine)
        assert node.local_gb_used == sum(i.root_gb for i in mine)
        assert node.memory_mb_used <= node.memory_mb * node.ram_allocation_ratio
    return report


async def _eventually_usage_matches(cluster: Any, hosts: tuple[str, ...]) -> dict[str, Any]:
    return await eventually(lambda: _usage_matches(cluster, hosts), 5, interval=0.1)


async def test_forty_concurrent_boots_all_active_and_usage_matches(cluster_factory: Any) -> None:
    async with cluster_factory() as cluster:
        uuids: list[str] = []
        results = await asyncio.gather(
            *(cluster.boot(flavor="small", name=f"vm{n}") for n in range(40))
        )
        for made in results:
            uuids.extend(made)
        insts = await cluster.wait_instances(uuids, timeout=90)
        assert [i.vm_state for i in insts] == ["active"] * 40
        report = await _eventually_usage_matches(cluster, cluster.spec.hosts)
        assert sum(r["instances"] for r in report.values()) == 40
        assert all(r["instances"] > 0 for r in report.values()), report


async def test_spawn_failure_on_one_host_reschedules(cluster_factory: Any) -> None:
    env = {"compute-1": {"FLEET_COMPUTE__FAILURES": "spawn:*"}}
    async with cluster_factory(agent_env=env) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm", forced_host=None)
        (inst,) = await cluster.wait_instances([uuid])
        assert inst.vm_state == "active"
        assert inst.host == "compute-2"
        # Both attempts are in the instance's one create action (read through the conductor).
        (action,) = [a for a in await _actions(cluster, uuid)]
        assert action["attempts"] == [("compute-1", "Error"), ("compute-2", "Success")]


async def _actions(cluster: Any, uuid: str) -> list[dict[str, Any]]:
    import asyncpg

    url = cluster.spec.database_url.replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(url)
    try:
        actions = await conn.fetch(
            "select id, action from instance_actions where instance_uuid=$1", uuid
        )
        out = []
        for a in actions:
            events = await conn.fetch(
                "select host, result from instance_action_events where action_id=$1 "
                "order by start_time",
                a["id"],
            )
            out.append({"action": a["action"], "attempts": [(e[0], e[1]) for e in events]})
        return out
    finally:
        await conn.close()


async def test_failure_everywhere_and_no_capacity_end_in_error_with_fault(
    cluster_factory: Any,
) -> None:
    env = {h: {"FLEET_COMPUTE__FAILURES": "spawn:*"} for h in ("compute-1", "compute-2")}
    async with cluster_factory(agent_env=env) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="doomed")
        (inst,) = await cluster.wait_instances([uuid])
        assert inst.vm_state == "error"
        fault = await InstanceFault.get_latest_for_instance(cluster.ctxt, uuid)
        assert "compute-" in (fault.message or "")
        from shared_objects.objects.flavor import Flavor

        await Flavor(
            cluster.ctxt, name="huge", flavorid="huge", vcpus=1, memory_mb=10**8, root_gb=1
        ).create()
        (big,) = await cluster.boot(flavor="huge", name="big")
        (inst,) = await cluster.wait_instances([big])
        assert inst.vm_state == "error"
        fault = await InstanceFault.get_latest_for_instance(cluster.ctxt, big)
        assert "No valid host was found" in (fault.message or "")


async def test_agent_sigkilled_mid_spawn_recovers_every_instance(cluster_factory: Any) -> None:
    env = {"compute-1": {"FLEET_COMPUTE__SPAWN_DELAY": "3"}}
    async with cluster_factory(agent_env=env) as cluster:
        uuids = await cluster.boot(flavor="small", name="slow", count=10, forced_host="compute-1")

        # Wait until all ten are spawning on compute-1, then kill it.
        async def all_spawning() -> bool:
            insts = list(await InstanceList.get_by_uuids(cluster.ctxt, uuids))
            return all(i.task_state == "spawning" for i in insts)

        await eventually(all_spawning, 10, interval=0.1, what="all ten spawning")
        await cluster.kill_process("compute-1")
        await cluster.restart_agent("compute-1")
        insts = await cluster.wait_instances(uuids, timeout=60)
        assert {i.vm_state for i in insts} <= {"active", "error"}
        assert all(i.task_state is None for i in insts)
        for inst in insts:
            if inst.vm_state == "error":
                fault = await InstanceFault.get_latest_for_instance(cluster.ctxt, inst.uuid)
                assert "restarted" in (fault.message or "")
        await _eventually_usage_matches(cluster, ("compute-1",))


def test_fleetctl_json_list_matches_database(cluster_factory: Any) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
        async with cluster_factory() as cluster:
            uuids = await cluster.boot(flavor="small", name="cli", count=3)
            await cluster.wait_instances(uuids)
            env = {
                **os.environ,
                "FLEET_TRANSPORT_URL": cluster.operator_url,
                "FLEET_CONTROL_EXCHANGE": cluster.spec.control_exchange,
            }
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "conductor.tools.fleetctl", "--format", "json", "list"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            listed = json.loads(out.stdout)
            db = {i.uuid: i for i in await InstanceList.get_all(cluster.ctxt)}
            return listed, {u: (db[u].host, db[u].vm_state) for u in db}, env

    listed, db, _ = asyncio.run(scenario())
    assert {r["uuid"]: (r["host"], r["vm_state"]) for r in listed} == db
    for row in listed:
        assert set(row) >= {"uuid", "name", "host", "vm_state", "task_state"}
