"""One request id followed through the JSON logs of the conductor and the agents (issue 7 b):
during a boot, and during a live migration (conductor, source and destination).

The operator's request context travels with ``build_instances`` to the conductor, and with the
``run_instance`` cast from the conductor to each agent; every RPC server binds its
``request_id`` into structlog's contextvars while the handler runs, so the log lines the build
writes on each service carry the operator's id.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from ops_cluster import OpsCluster, OpsClusterFactory

from shared_objects.context import RequestContext, generate_request_id
from shared_objects.testing.eventually import eventually

pytestmark = pytest.mark.integration


def lines_for(cluster: OpsCluster, name: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in cluster.log_lines(name) if r.get("request_id") == request_id]


async def eventually_logged(
    cluster: OpsCluster, name: str, request_id: str, event: str, count: int
) -> list[dict[str, Any]]:
    """The ``event`` lines of ``name`` carrying ``request_id``, once there are ``count``."""

    def logged() -> list[dict[str, Any]]:
        found = [r for r in lines_for(cluster, name, request_id) if r.get("event") == event]
        assert len(found) >= count, found
        return found

    # The line comes as the handler ends, after ACTIVE: allow 20 s.
    return await eventually(logged, 20, interval=0.1)


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


async def events_by_host(cluster: OpsCluster, request_id: str) -> dict[str, set[str]]:
    """``{host: {event, ...}}`` of the instance action events recorded under ``request_id``.

    An agent records an event under the action of the request context it was called with, so
    an event of host H under the operator's action shows that H received the operator's id.
    """
    conn = await asyncpg.connect(cluster.spec.database_url.replace("+asyncpg", ""))
    try:
        rows = await conn.fetch(
            "SELECT e.host, e.event FROM instance_action_events e "
            "JOIN instance_actions a ON a.id = e.action_id WHERE a.request_id = $1",
            request_id,
        )
    finally:
        await conn.close()
    out: dict[str, set[str]] = {}
    for row in rows:
        out.setdefault(str(row["host"]), set()).add(row["event"])
    return out


async def test_live_migration_request_id_reaches_conductor_and_both_agents(
    ops_cluster: OpsClusterFactory,
) -> None:
    async with ops_cluster() as cluster:
        assert cluster.tasks is not None
        (uuid,) = await cluster.boot(flavor="small", name="mover", forced_host="compute-1")
        await cluster.wait_instances([uuid], timeout=60)
        request_id = generate_request_id()
        ctxt = RequestContext(
            request_id=request_id, user_id="operator", project_id="admin", is_admin=True
        )
        mig = await cluster.tasks.live_migrate_instance(ctxt, instance_uuid=uuid, host="compute-2")

        async def finished() -> dict[str, Any] | None:
            got = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=mig)
            return got if got["status"] in ("completed", "failed", "error", "cancelled") else None

        got = await eventually(finished, 30, interval=0.1)
        assert got["status"] == "completed", got
        (inst,) = await cluster.wait_instances([uuid], timeout=30)
        assert inst.host == "compute-2"

        accepted = await eventually_logged(
            cluster, "conductor-1", request_id, "live_migration_accepted", 1
        )
        assert accepted and accepted[0]["service"] == "conductor"
        done = await eventually_logged(
            cluster, "compute-1", request_id, "live_migration_completed", 1
        )
        assert done and done[0]["instance_uuid"] == uuid
        # The context (and its id) reached the destination: its events sit under the action.
        events = await events_by_host(cluster, request_id)
        assert "compute_live_migration" in events.get("compute-1", set()), events
        assert "compute_pre_live_migration" in events.get("compute-2", set()), events
        # And the destination logged its side of the migration under the operator's id.
        arrived = await eventually_logged(
            cluster, "compute-2", request_id, "live_migration_pre_destination", 1
        )
        assert arrived, [r.get("event") for r in cluster.log_lines("compute-2")][-30:]
        assert arrived[0]["instance_uuid"] == uuid and arrived[0]["host"] == "compute-2"
        checked = lines_for(cluster, "compute-2", request_id)
        assert "live_migration_check_destination" in {r.get("event") for r in checked}
