"""Live migration across processes on RabbitMQ + PostgreSQL (issue 5 acceptance a, e, f).

Agents and the conductor use a 2 s call-monitor window (a heartbeat a second), so a SIGKILLed
peer is noticed in about two seconds. After each test the fleet invariants are checked against
the hypervisors' state files and the database.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from compute_agent.testing_invariants import assert_fleet_invariants
from compute_agent.virt.state_view import hypervisor_view
from shared_objects import exception
from shared_objects.objects.instance import Instance
from shared_objects.testing.eventually import eventually

pytestmark = pytest.mark.integration

# One [live_migration] section for the conductor and the agents.
HEARTBEATS = {
    "FLEET_LIVE_MIGRATION__CALL_MONITOR_TIMEOUT": "2",
    "FLEET_LIVE_MIGRATION__RPC_TIMEOUT": "3",
    "FLEET_LIVE_MIGRATION__PHASE_QUERY_TIMEOUT": "2",
    "FLEET_LIVE_MIGRATION__SETTLE_RETRY_INTERVAL": "1",
    "FLEET_LIVE_MIGRATION__PROGRESS_INTERVAL": "0.1",
}
FINISHED = {"completed", "failed", "error", "cancelled"}


def _models(model: str) -> dict[str, dict[str, str]]:
    return {h: {"FLEET_COMPUTE__MIGRATION": model} for h in ("compute-1", "compute-2")}


async def _invariants(cluster: Any) -> None:
    async def hold() -> bool:
        view = await hypervisor_view(Path(cluster.workdir) / "hypervisors")
        await assert_fleet_invariants(cluster.ctxt, view)
        return True

    # Usage reaches the ComputeNode a moment after the claim changes.
    await eventually(hold, 5, interval=0.1)


async def _wait(cluster: Any, mig: str, statuses: set[str], within: float = 60) -> dict[str, Any]:
    async def reached() -> dict[str, Any]:
        got = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=mig)
        assert got["status"] in statuses, f"migration {mig} stuck in {got['status']}"
        return dict(got)

    return await eventually(reached, within)


async def _copying(cluster: Any, mig: str) -> None:
    """The source reported copy progress: the memory copy is under way."""

    async def progressed() -> bool:
        got = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=mig)
        return got["memory_processed"] is not None

    await eventually(progressed, 30, what=f"copy progress of migration {mig}")


async def _wait_idle(cluster: Any, uuid: str, within: float = 60) -> Instance:
    async def idle() -> Instance:
        inst = await Instance.get_by_uuid(cluster.ctxt, uuid)
        assert inst.task_state is None, f"instance {uuid} stuck in {inst.task_state}"
        return inst

    return await eventually(idle, within, interval=0.1)


@pytest.mark.parametrize("conductors", [1, 2])
async def test_ten_concurrent_migrations_a_to_b(cluster_factory: Any, conductors: int) -> None:
    async with cluster_factory(
        common_env=HEARTBEATS,
        agent_env=_models("bandwidth_mb_s=1000,progress_interval_s=0.05"),
        conductors=conductors,
    ) as cluster:
        uuids = await cluster.boot(flavor="small", name="vm", count=10, forced_host="compute-1")
        await cluster.wait_instances(uuids, timeout=60)
        migs = await asyncio.gather(
            *(
                cluster.tasks.live_migrate_instance(cluster.ctxt, instance_uuid=u, host="compute-2")
                for u in uuids
            )
        )
        samples: dict[str, list[tuple[int, int]]] = {m: [] for m in migs}
        pending = set(migs)

        async def all_finished() -> bool:
            for mig in list(pending):
                got = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=mig)
                if got["memory_processed"] is not None:
                    samples[mig].append((got["memory_processed"], got["progress"] or 0))
                if got["status"] in FINISHED:
                    if got["status"] != "completed":
                        pytest.fail(f"migration ended {got}")
                    pending.discard(mig)
            return not pending

        await eventually(all_finished, 90, what="every migration's end")
        for mig, seen in samples.items():
            processed = [p for p, _ in seen]
            percent = [q for _, q in seen]
            assert processed == sorted(processed), (mig, seen)
            assert percent == sorted(percent) and percent[-1] == 100, (mig, seen)
        for u in uuids:
            inst = await Instance.get_by_uuid(cluster.ctxt, u)
            assert (inst.host, inst.vm_state, inst.task_state) == ("compute-2", "active", None)
        await _invariants(cluster)


async def test_source_sigkilled_mid_copy_recovers_on_source(cluster_factory: Any) -> None:
    stalls = "dirty_rate_mb_s=2000,stall_rounds=100000,max_rounds=100000,round_interval_s=0.02"
    async with cluster_factory(common_env=HEARTBEATS, agent_env=_models(stalls)) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm", forced_host="compute-1")
        await cluster.wait_instances([uuid], timeout=60)
        mig = await cluster.tasks.live_migrate_instance(
            cluster.ctxt, instance_uuid=uuid, host="compute-2"
        )
        await _wait(cluster, mig, {"running"})
        await _copying(cluster, mig)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        await cluster.kill_process("compute-1")
        got = await _wait(cluster, mig, FINISHED, within=20)
        assert got["status"] == "error"
        assert loop.time() - killed < 6.0  # the conductor's heartbeat window, not an hour
        await cluster.restart_agent("compute-1")
        inst = await _wait_idle(cluster, uuid)
        assert (inst.host, inst.vm_state) == ("compute-1", "active")
        assert (await _wait(cluster, mig, FINISHED))["status"] == "error"
        await _invariants(cluster)


async def test_destination_sigkilled_mid_copy_recovers_on_destination(
    cluster_factory: Any,
) -> None:
    steady = "bandwidth_mb_s=150,dirty_rate_mb_s=20,round_interval_s=0.05"
    async with cluster_factory(common_env=HEARTBEATS, agent_env=_models(steady)) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm", forced_host="compute-1")
        await cluster.wait_instances([uuid], timeout=60)
        mig = await cluster.tasks.live_migrate_instance(
            cluster.ctxt, instance_uuid=uuid, host="compute-2"
        )
        await _wait(cluster, mig, {"running"})
        await cluster.kill_process("compute-2")
        # The copy switches over; post at the destination gets no heartbeat: error, pending.
        got = await _wait(cluster, mig, FINISHED, within=30)
        assert got["status"] == "error"
        inst = await Instance.get_by_uuid(cluster.ctxt, uuid)
        assert inst.task_state == "migrating"  # undecidable without the destination
        await cluster.restart_agent("compute-2")
        inst = await _wait_idle(cluster, uuid)
        assert (inst.host, inst.vm_state) == ("compute-2", "active")
        assert (await _wait(cluster, mig, {"completed"}))["status"] == "completed"
        await _invariants(cluster)


@pytest.mark.parametrize(
    ("host", "rule", "statuses", "fault_text"),
    [
        ("compute-2", "check_can_live_migrate_destination:*", {"failed"}, "prechecks"),
        ("compute-1", "check_can_live_migrate_source:*", {"failed"}, "prechecks"),
        ("compute-2", "pre_live_migration:*", {"failed"}, "pre_live_migration"),
        ("compute-1", "live_migration_copy:1:after=3", {"failed"}, "InjectedFailure"),
        (
            "compute-2",
            "post_live_migration_at_destination:*",
            {"error"},
            "post_live_migration_at_destination",
        ),
    ],
)
async def test_failure_points_across_processes_leave_instance_on_source(
    cluster_factory: Any,
    tmp_path: Path,
    host: str,
    rule: str,
    statuses: set[str],
    fault_text: str,
) -> None:
    from shared_objects.objects.instance_fault import InstanceFault

    rules = tmp_path / f"failures-{host}"
    agent_env = _models("bandwidth_mb_s=2000,round_interval_s=0.02")
    agent_env[host] = {**agent_env[host], "FLEET_COMPUTE__FAILURES_FILE": str(rules)}
    async with cluster_factory(common_env=HEARTBEATS, agent_env=agent_env) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm", forced_host="compute-1")
        await cluster.wait_instances([uuid], timeout=60)
        staged = rules.with_suffix(".tmp")
        staged.write_text(rule)
        staged.replace(rules)  # atomically: the agent re-reads it at its next step
        mig = await cluster.tasks.live_migrate_instance(
            cluster.ctxt, instance_uuid=uuid, host="compute-2"
        )
        got = await _wait(cluster, mig, FINISHED)
        assert got["status"] in statuses, got
        inst = await _wait_idle(cluster, uuid)
        assert (inst.host, inst.vm_state) == ("compute-1", "active")

        # The source records the fault after it has settled the migration's status: poll.
        async def fault_recorded() -> bool:
            try:
                fault = await InstanceFault.get_latest_for_instance(cluster.ctxt, uuid)
            except exception.InstanceFaultNotFound:
                return False
            return fault_text in (fault.message or "")

        await eventually(fault_recorded, 10, interval=0.1, what=f"fault {fault_text!r}")
        await _invariants(cluster)  # includes: compute-2's usage is zero again


async def test_non_convergence_aborts_by_default_across_processes(cluster_factory: Any) -> None:
    never = "dirty_rate_mb_s=2000,stall_rounds=20,round_interval_s=0.02"
    async with cluster_factory(common_env=HEARTBEATS, agent_env=_models(never)) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm", forced_host="compute-1")
        await cluster.wait_instances([uuid], timeout=60)
        mig = await cluster.tasks.live_migrate_instance(
            cluster.ctxt, instance_uuid=uuid, host="compute-2"
        )
        assert (await _wait(cluster, mig, FINISHED))["status"] == "failed"
        inst = await _wait_idle(cluster, uuid)
        assert inst.host == "compute-1"
        await _invariants(cluster)


async def test_abort_and_force_complete_across_processes(cluster_factory: Any) -> None:
    stalls = "dirty_rate_mb_s=2000,stall_rounds=100000,max_rounds=100000,round_interval_s=0.02"
    async with cluster_factory(common_env=HEARTBEATS, agent_env=_models(stalls)) as cluster:
        uuids = await cluster.boot(flavor="small", name="vm", count=2, forced_host="compute-1")
        await cluster.wait_instances(uuids, timeout=60)
        aborted, forced = [
            await cluster.tasks.live_migrate_instance(
                cluster.ctxt, instance_uuid=u, host="compute-2"
            )
            for u in uuids
        ]
        for mig in (aborted, forced):
            await _wait(cluster, mig, {"running"})
            await _copying(cluster, mig)
        await cluster.tasks.live_migration_abort(cluster.ctxt, migration_uuid=aborted)
        await cluster.tasks.live_migration_force_complete(cluster.ctxt, migration_uuid=forced)
        assert (await _wait(cluster, aborted, FINISHED))["status"] == "cancelled"
        assert (await _wait(cluster, forced, FINISHED))["status"] == "completed"
        hosts = [(await _wait_idle(cluster, u)).host for u in uuids]
        assert hosts == ["compute-1", "compute-2"]
        await _invariants(cluster)
