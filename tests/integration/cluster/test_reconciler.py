"""The conductor's reconciler on PostgreSQL and across processes (issue 13, acceptance b).

* A build cast to an agent that was stopped a moment earlier (SIGKILL; and a graceful SIGTERM)
  ends ACTIVE on the other host, without that agent coming back, within the bound: the host is
  seen down after ``service_down_time``, the next pass places the build elsewhere.
* Two reconcilers passing at once over the same stranded rows change each row once between them
  (no leader: every change is a compare-and-swap).
* The cost of a pass over 10,000 instances.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

import asyncpg
import pytest

from conductor.reconcile import rules, statements
from conductor.testing.reconcile import World, reconcile_world
from shared_objects.context import RequestContext
from shared_objects.objects.instance_fault import InstanceFault

pytestmark = pytest.mark.integration

# Short bounds for the cluster (its service_down_time is 10 s, reports every 2 s).
RECONCILE_ENV = {
    "FLEET_CONDUCTOR__RECONCILE_INTERVAL": "1",
    "FLEET_CONDUCTOR__BUILD_HOST_DOWN_AFTER": "2",
    "FLEET_CONDUCTOR__BUILD_RECAST_AFTER": "15",
    "FLEET_CONDUCTOR__BUILD_RESCHEDULE_AFTER": "15",
    "FLEET_CONDUCTOR__ACTION_SETTLE_AFTER": "5",
}
# service_down_time + a pass + a build, with room for a loaded machine.
BOUND = 45.0


async def _run_events(cluster: Any, uuid: str) -> list[tuple[str, str | None]]:
    url = cluster.spec.database_url.replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "select e.host, e.result from instance_action_events e "
            "join instance_actions a on a.id = e.action_id "
            "where a.instance_uuid = $1 and e.event = 'compute_run_instance' order by e.id",
            uuid,
        )
        return [(r["host"], r["result"]) for r in rows]
    finally:
        await conn.close()


async def test_build_cast_to_a_killed_agent_ends_active_on_another_host(
    cluster_factory: Any,
) -> None:
    async with cluster_factory(common_env=RECONCILE_ENV) as cluster:
        await cluster.kill_process("compute-1")
        started = time.monotonic()
        # Its service still looks up (for service_down_time): the build is placed there.
        uuids = await cluster.boot(flavor="small", name="orphan", count=2, forced_host="compute-1")
        insts = await cluster.wait_instances(uuids, timeout=BOUND)
        took = time.monotonic() - started
        assert [(i.vm_state, i.host) for i in insts] == [("active", "compute-2")] * 2
        assert not cluster.processes["compute-1"].running
        for uuid in uuids:
            # Two attempts under the one create action: the dead host's closed as Error.
            events = await _run_events(cluster, uuid)
            assert ("compute-1", "Error") in events and events[-1] == ("compute-2", "Success")
        print(f"killed agent: builds active elsewhere after {took:.1f}s")


async def test_build_cast_to_a_gracefully_stopped_agent_ends_active_on_another_host(
    cluster_factory: Any,
) -> None:
    async with cluster_factory(common_env=RECONCILE_ENV) as cluster:
        assert await cluster.stop_process("compute-1") == 0
        started = time.monotonic()
        # Without a forced host: an agent that marks its service down on stop gets none of
        # these; one that does not gets about half, which the reconciler moves.
        uuids = await cluster.boot(flavor="small", name="after-stop", count=4)
        insts = await cluster.wait_instances(uuids, timeout=BOUND)
        took = time.monotonic() - started
        assert [(i.vm_state, i.host) for i in insts] == [("active", "compute-2")] * 4
        assert not cluster.processes["compute-1"].running
        print(f"stopped agent: builds active elsewhere after {took:.1f}s")


async def test_build_with_no_other_host_ends_in_error_with_a_fault(cluster_factory: Any) -> None:
    async with cluster_factory(common_env=RECONCILE_ENV, hosts=("compute-1",)) as cluster:
        await cluster.kill_process("compute-1")
        (uuid,) = await cluster.boot(flavor="small", name="nowhere", forced_host="compute-1")
        (inst,) = await cluster.wait_instances([uuid], timeout=BOUND)
        assert inst.vm_state == "error"
        fault = await InstanceFault.get_latest_for_instance(cluster.ctxt, uuid)
        assert "compute-1 is down" in (fault.message or "")


# --- two conductors at once, and the cost of a pass, on PostgreSQL ---------------------------


async def _stranded(world: World, n: int) -> dict[str, list[str]]:
    await world.host("dead", up=False)
    await world.host("alive")
    made: dict[str, list[str]] = {"spawning": [], "scheduling": [], "deleting": [], "settled": []}
    for _ in range(n):
        made["spawning"].append(
            await world.instance(host="dead", task_state="spawning", age=31, attempts=("dead",))
        )
        made["scheduling"].append(
            await world.instance(host="dead", task_state="scheduling", age=31)
        )
        made["deleting"].append(
            await world.instance(host="dead", task_state="deleting", vm_state="active", age=31)
        )
        made["settled"].append(
            await world.instance(host="alive", task_state=None, vm_state="active", age=31)
        )
    return made


async def test_two_reconcilers_at_once_change_each_row_once(pg_database_url: str) -> None:
    async with (
        reconcile_world(pg_database_url) as one,
        reconcile_world(pg_database_url, migrate=False) as two,
    ):
        made = await _stranded(one, 15)
        first, second = one.reconciler(), two.reconciler()
        # The worst case first: both read the same stranded rows, then both act at once.
        now = datetime.datetime.now(datetime.UTC)
        plans = [rules.plan((await r.read(now))[0], r.bounds) for r in (first, second)]
        assert plans[0] == plans[1] and len(plans[0].moves) == 15
        await asyncio.gather(first._act(plans[0], now), second._act(plans[1], now))
        for _ in range(2):
            await asyncio.gather(first.run_pass(), second.run_pass())

        def total(rule: str) -> float:
            return sum(r.actions.labels(rule=rule)._value.get() for r in (first, second))

        print(
            "acted:",
            [
                sum(r.actions.labels(rule=x)._value.get() for x in rules.RULES)
                for r in (first, second)
            ],
        )
        assert total(rules.SPAWN_HOST_DOWN) == 15
        assert total(rules.BUILD_HOST_DOWN) == 15
        assert total(rules.DELETE_HOST_DOWN) == 15
        assert total(rules.ACTION_UNFINISHED) == 15
        casts = one.compute.casts + two.compute.casts
        assert sorted(c.instance_uuid for c in casts) == sorted(made["scheduling"])
        assert {c.host for c in casts} == {"alive"}
        for uuid in made["spawning"]:
            faults = await one.rows("instance_faults", {"instance_uuid": uuid})
            assert len(faults) == 1, faults
            inst = await one.row("instances", {"uuid": uuid})
            assert (inst["vm_state"], inst["task_state"]) == ("error", None)
        for uuid in made["deleting"]:
            assert (await one.row("instances", {"uuid": uuid}))["deleted"]
        for uuid in made["scheduling"]:
            inst = await one.row("instances", {"uuid": uuid})
            assert (inst["host"], inst["task_state"]) == ("alive", "scheduling")


async def _fill(url: str, *, settled: int, stranded: int) -> None:
    """``settled`` ACTIVE instances with finished actions and ``stranded`` spawning on the dead
    host (open actions), in a few set-based statements."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        for count, host, vm, task, finish in (
            (settled, "alive", "active", None, "now()"),
            (stranded, "dead", "building", "spawning", "null"),
        ):
            await conn.execute(
                "insert into instances (uuid, name, host, vm_state, task_state, vcpus, "
                "memory_mb, root_gb, ephemeral_gb, locked, created_at, updated_at, deleted) "
                "select gen_random_uuid()::text, 'vm', $1::text, $2::text, $3::text, 1, 512, 1, 0, "
                "false, now() - interval '1 hour', now() - interval '1 hour', false "
                "from generate_series(1, $4::int)",
                host,
                vm,
                task,
                count,
            )
            await conn.execute(
                "insert into instance_actions (action, instance_uuid, request_id, start_time, "
                f"finish_time, created_at, deleted) select 'create', uuid, 'req-' || uuid, "
                f"now() - interval '1 hour', {finish}, now(), false from instances "
                "where host = $1 and not exists (select 1 from instance_actions a "
                "where a.instance_uuid = instances.uuid)",
                host,
            )
    finally:
        await conn.close()


async def test_a_pass_over_ten_thousand_instances(pg_database_url: str) -> None:
    async with reconcile_world(pg_database_url) as world:
        await world.host("dead", up=False)
        await world.host("alive")
        await _fill(pg_database_url, settled=9_500, stranded=500)
        reconciler = world.reconciler()
        await reconciler.run_pass()  # warm: statements prepared, pool filled
        # The 500 stranded builds were failed by that pass; measure a quiet pass and a busy one.
        quiet = await reconciler.run_pass()
        await _fill(pg_database_url, settled=0, stranded=500)
        busy = await reconciler.run_pass()
        assert quiet.acted == 0 and busy.acted == 500
        assert busy.statements <= 12, busy
        print(
            f"10,000 instances: quiet pass {quiet.seconds * 1000:.0f} ms "
            f"({quiet.statements} statements); 500 builds failed in one pass "
            f"{busy.seconds * 1000:.0f} ms ({busy.statements} statements)"
        )
        assert quiet.seconds < 5 and busy.seconds < 10


async def test_lost_cast_is_sent_again_once_on_postgresql(pg_database_url: str) -> None:
    """The re-cast marker (an event stamped with the instance's own ``updated_at``) compares
    equal on PostgreSQL's timestamps too."""
    async with reconcile_world(pg_database_url) as world:
        await world.host("slow")
        await world.host("other")
        uuid = await world.instance(host="slow", task_state="scheduling", age=31)
        reconciler = world.reconciler()
        await reconciler.run_pass()
        ctxt = RequestContext(is_admin=True)
        async with world.database.request(ctxt):
            later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
            (row,) = await statements.transitional_instances(ctxt.db, older_than=later, limit=5)
        assert row["recast"] is True  # the marker matches the instance's stamp exactly
        await world.age("instances", {"uuid": uuid}, 45)
        await reconciler.run_pass()
        assert [c.host for c in world.compute.casts] == ["slow"]
        await world.age("instances", {"uuid": uuid}, 61)
        await reconciler.run_pass()
        assert [c.host for c in world.compute.casts] == ["slow", "other"]
