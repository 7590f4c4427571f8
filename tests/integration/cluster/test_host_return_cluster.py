"""An agent killed mid-spawn comes back after the reconciler failed its build (issue 13).

Real processes on RabbitMQ and PostgreSQL: compute-1 spawns slowly, is killed (SIGKILL) while
the guest is being built, the conductor's reconciler puts the build in ERROR once the host is
seen down (``spawn_host_down``), then the agent starts again: its guest is removed from the
hypervisor and its compute node reports no usage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.instance import Instance
from shared_objects.testing.eventually import eventually

pytestmark = pytest.mark.integration

# Short bounds for the cluster (its service_down_time is 10 s, reports every 2 s).
RECONCILE_ENV = {
    "FLEET_CONDUCTOR__RECONCILE_INTERVAL": "1",
    "FLEET_CONDUCTOR__BUILD_HOST_DOWN_AFTER": "2",
    "FLEET_CONDUCTOR__BUILD_RECAST_AFTER": "15",
    "FLEET_CONDUCTOR__BUILD_RESCHEDULE_AFTER": "15",
    "FLEET_CONDUCTOR__ACTION_SETTLE_AFTER": "5",
}
# service_down_time + a pass, with room for a loaded machine.
BOUND = 45.0


def _guests(cluster: Any, host: str) -> dict[str, Any]:
    """The guests in ``host``'s hypervisor state file (the fake driver's)."""
    path = Path(cluster.workdir) / "hypervisors" / f"{host}.json"
    return dict(json.loads(path.read_text(encoding="utf-8")).get("guests") or {})


async def _wait_row(cluster: Any, uuid: str, want: tuple[str, str | None]) -> Instance:
    async def reached() -> Instance:
        inst = await Instance.get_by_uuid(cluster.ctxt, uuid)
        assert (inst.vm_state, inst.task_state) == want, f"{inst.vm_state}/{inst.task_state}"
        return inst

    return await eventually(reached, BOUND, interval=0.2)


async def _wait_usage(cluster: Any, host: str, memory_mb: int) -> None:
    async def used() -> bool:
        (node,) = await ComputeNodeList.get_all_by_host(cluster.ctxt, host)
        assert node.memory_mb_used == memory_mb, f"{host} uses {node.memory_mb_used} MB"
        return True

    await eventually(used, 15, interval=0.2)


async def test_agent_killed_mid_spawn_removes_its_guest_after_the_reconciler_failed_it(
    cluster_factory: Any,
) -> None:
    async with cluster_factory(
        common_env=RECONCILE_ENV,
        agent_env={"compute-1": {"FLEET_COMPUTE__SPAWN_DELAY": "300"}},
    ) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="cut", forced_host="compute-1")
        await _wait_row(cluster, uuid, ("building", "spawning"))
        await _wait_usage(cluster, "compute-1", 512)  # the build's claim was reported
        await cluster.kill_process("compute-1")
        assert uuid in _guests(cluster, "compute-1")
        inst = await _wait_row(cluster, uuid, ("error", None))
        assert inst.host == "compute-1" and inst.launched_at is None
        await cluster.restart_agent("compute-1")
        assert uuid not in _guests(cluster, "compute-1")
        assert "recovery_unfinished_build_guest_removed" in cluster.log_tail("compute-1", 200)
        await _wait_usage(cluster, "compute-1", 0)
        inst = await Instance.get_by_uuid(cluster.ctxt, uuid)
        assert (inst.vm_state, inst.host) == ("error", "compute-1")
