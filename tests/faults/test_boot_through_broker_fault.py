"""Issue 13 acceptance a: a broker restart or crash in the middle of a boot strands nothing.

Twenty instances boot on two agents (separate processes, one broker login each) while their
guests are still spawning, the private broker node is restarted (``stop_app`` for 3 s) or killed
and revived. Every instance must end ACTIVE, or ERROR with a fault, within 60 s of the broker's
return, and none of the operator's own calls may outlive its deadline meanwhile.

Before the fix, every build stayed ``building/spawning`` for good with nothing in any log: aiormq
had cancelled the agents' in-flight ``run_instance`` handlers along with their channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conductor.tools.cluster import LocalCluster
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.testing import RabbitNode
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

COUNT = 20
SPAWN_DELAY = 3.0  # long enough that the fault lands while every guest is spawning
SETTLE_WITHIN = 60.0
# LocalCluster's operator client waits 30 s for a reply: a call still running after that hangs.
CALL_TIMEOUT = 30.0
SLACK = 2.0


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


@pytest.fixture
async def cluster(node: RabbitNode, cluster_factory: Any) -> AsyncIterator[LocalCluster]:
    async with cluster_factory(
        node=node, common_env={"FLEET_COMPUTE__SPAWN_DELAY": str(SPAWN_DELAY)}, check_exits=False
    ) as local:
        yield local


async def _settle(cluster: LocalCluster, uuids: list[str], within: float) -> list[Instance]:
    """Poll until every instance is final; each poll is a call that must keep its deadline."""
    assert cluster.conductor is not None
    deadline = time.monotonic() + within
    slowest = 0.0
    found: list[Instance] = []
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            async with asyncio.timeout(CALL_TIMEOUT + SLACK):
                found = list(await InstanceList.get_by_uuids(cluster.ctxt, uuids))
        except TimeoutError:
            pytest.fail(f"an operator call outlived its {CALL_TIMEOUT} s deadline")
        except Exception:  # the broker may still be settling: try again
            found = []
        slowest = max(slowest, time.monotonic() - started)
        if found and all(i.task_state is None and i.vm_state in ("active", "error") for i in found):
            return found
        await asyncio.sleep(0.5)
    states = sorted({f"{i.vm_state}/{i.task_state}" for i in found})
    raise AssertionError(f"instances not final {within} s after the broker returned: {states}")


@pytest.mark.parametrize("fault", ["restart", "kill"])
async def test_boot_through_a_broker_fault_ends_every_instance(
    cluster: LocalCluster, node: RabbitNode, fault: str
) -> None:
    uuids = await cluster.boot(flavor="small", name="storm", count=COUNT)

    async def spawning() -> bool:
        insts = await InstanceList.get_by_uuids(cluster.ctxt, uuids)
        return any(i.task_state == "spawning" for i in insts)

    # The fault must land mid-build (guests spawning), not before the agents took the builds.
    await eventually(spawning, 20, interval=0.1, what="guests spawning")
    if fault == "restart":
        await node.restart_app(down_for=3.0)
    else:
        await node.kill()
        await asyncio.sleep(2.0)  # the broker stays dead for a while: the fault itself
        await node.revive()
    back = time.monotonic()

    final = await _settle(cluster, uuids, SETTLE_WITHIN)
    settled_after = time.monotonic() - back

    errors = [i for i in final if i.vm_state == "error"]
    for instance in errors:
        fault_row = await InstanceFault.get_latest_for_instance(cluster.ctxt, instance.uuid)
        assert fault_row.message, f"{instance.uuid} is in ERROR without a fault"
    hosts = {i.host for i in final if i.vm_state == "active"}
    assert hosts <= set(cluster.spec.hosts)
    print(
        f"\n{fault}: {COUNT - len(errors)} active, {len(errors)} error, "
        f"final {settled_after:.1f} s after the broker returned"
    )
