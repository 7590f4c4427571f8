"""One request id followed through the JSON logs of the conductor and the agents (issue 7 b).

The operator's request context travels with ``build_instances`` to the conductor, and with the
``run_instance`` cast from the conductor to each agent; every RPC server binds its
``request_id`` into structlog's contextvars while the handler runs, so the log lines the build
writes on each service carry the operator's id.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ops_cluster import OpsCluster, OpsClusterFactory

from shared_objects.context import RequestContext, generate_request_id

pytestmark = pytest.mark.integration


def lines_for(cluster: OpsCluster, name: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in cluster.log_lines(name) if r.get("request_id") == request_id]


async def eventually_logged(
    cluster: OpsCluster, name: str, request_id: str, event: str, count: int
) -> list[dict[str, Any]]:
    """The ``event`` lines of ``name`` carrying ``request_id``, once there are ``count``."""
    found: list[dict[str, Any]] = []
    for _ in range(50):  # log lines are flushed per line; allow the writer a moment
        found = [r for r in lines_for(cluster, name, request_id) if r.get("event") == event]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    return found


async def test_boot_request_id_appears_in_conductor_and_agent_logs(
    ops_cluster: OpsClusterFactory,
) -> None:
    async with ops_cluster() as cluster:
        assert cluster.tasks is not None
        request_id = generate_request_id()
        ctxt = RequestContext(
            request_id=request_id, user_id="operator", project_id="admin", is_admin=True
        )
        made = await cluster.tasks.build_instances(ctxt, flavor="small", name="traced", count=4)
        uuids = [m["uuid"] for m in made]
        insts = await cluster.wait_instances(uuids, timeout=60)
        assert {i.vm_state for i in insts} == {"active"}
        by_host: dict[str, set[str]] = {}
        for inst in insts:
            by_host.setdefault(str(inst.host), set()).add(inst.uuid)
        assert set(by_host) == {"compute-1", "compute-2"}, by_host  # the request is spread

        # Conductor: the scheduling decision of every instance carries the operator's id.
        scheduled = await eventually_logged(
            cluster, "conductor-1", request_id, "build_scheduled", 4
        )
        assert {r["instance_uuid"] for r in scheduled} == set(uuids)
        assert all(r["service"] == "conductor" for r in scheduled)

        # Each agent: the build of each of its instances, logged under the same id.
        for host, mine in by_host.items():
            done = await eventually_logged(cluster, host, request_id, "build_succeeded", len(mine))
            assert {r["instance_uuid"] for r in done} == mine, (host, done)
            assert all(r["service"] == "compute-agent" and r["host"] == host for r in done)

        # And no build line of these instances was written under another id.
        for name in ("conductor-1", *by_host):
            stray = [
                r
                for r in cluster.log_lines(name)
                if r.get("instance_uuid") in uuids
                and r.get("event") in ("build_scheduled", "build_succeeded")
                and r.get("request_id") != request_id
            ]
            assert not stray, (name, stray)
