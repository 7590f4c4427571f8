"""The hot statements use an index at a thousand hosts and ten thousand instances (PostgreSQL).

The statements are the real ones: each operation runs through its code path (objects, host view,
reconciler) on SQLAlchemy's execution, which lets a listener capture the SQL and parameters; each
is then EXPLAINed with those parameters. A scan of a whole table is what every listing of all
hosts must do (the host view's full read, the reconciler's liveness read): those are named and
allowed; everything else must not scan instances, compute nodes or services sequentially.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text

from conductor.db import migration
from conductor.db.session import Database
from conductor.host_view import HostView, HostViewSettings
from conductor.liveness import LivenessBatcher
from conductor.reconcile import statements as reconcile
from conductor.testing import hosts as sim
from shared_objects.context import RequestContext
from shared_objects.objects.compute_node import ComputeNode
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.service import Service
from shared_objects.releases import BINARY_COMPUTE

pytestmark = pytest.mark.integration

HOSTS = 1000
INSTANCES = 10_000
WATCHED = re.compile(r"Seq Scan on (instances|compute_nodes|services)\b")
# Without help: the services table of a thousand hosts is a few pages, which the planner may
# rightly read whole for a statement about many hosts (a batched heartbeat, the view's delta).
WATCHED_NATURAL = re.compile(r"Seq Scan on (instances|compute_nodes)\b")

# One statement each, no parameters: the bulk of the load stays on the server.
_LOAD_INSTANCES = f"""
INSERT INTO instances (uuid, name, host, node, vm_state, task_state, vcpus, memory_mb, root_gb,
                       ephemeral_gb, deleted, locked, created_at, updated_at)
SELECT gen_random_uuid()::text, 'vm-' || i, h, h, 'active',
       CASE WHEN i % 200 = 0 THEN 'scheduling' END, 1, 512, 1, 0, false, false,
       now() - interval '2 days', now() - (i % 3600) * interval '1 second'
FROM generate_series(1, {INSTANCES}) AS i,
     LATERAL (SELECT 'sim-' || lpad(((i - 1) % {HOSTS})::text, 5, '0') AS h) AS host
"""
_LOAD_ACTIONS = """
INSERT INTO instance_actions (action, instance_uuid, request_id, start_time, finish_time,
                              deleted, created_at)
SELECT 'create', uuid, 'req-' || id, created_at,
       CASE WHEN id % 500 = 0 THEN NULL ELSE created_at + interval '10 seconds' END,
       false, created_at
FROM instances
"""


class Captured:
    def __init__(self) -> None:
        self.statements: list[tuple[str, str, Any]] = []
        self.label = ""

    def __call__(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        self.statements.append((self.label, statement, params))


@pytest.fixture
async def loaded(pg_database_url: str) -> AsyncIterator[tuple[Database, Captured]]:
    await migration.upgrade(pg_database_url)
    database = Database(pg_database_url, driver_path=False)
    try:
        hosts = sim.host_names(HOSTS)
        # Registered an hour ago (only what changes since shows in a delta), seen up now.
        await sim.insert_hosts(
            database.engine, hosts, stamp=sim.utcnow() - datetime.timedelta(hours=1)
        )
        # A few hosts near the down time, so the view's liveness read asks about some.
        old = sim.utcnow() - datetime.timedelta(seconds=50)
        await sim.heartbeat(database.engine, hosts[:20], stamp=old)
        async with database.engine.begin() as conn:
            await conn.execute(text(_LOAD_INSTANCES))
            await conn.execute(text(_LOAD_ACTIONS))
        async with database.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE"))
        captured = Captured()
        event.listen(database.engine.sync_engine, "before_cursor_execute", captured)
        yield database, captured
    finally:
        await database.dispose()


async def _run_hot_paths(database: Database, captured: Captured) -> None:
    ctxt = RequestContext(user_id="admin", project_id="p1")
    now = sim.utcnow()

    def step(label: str) -> Any:
        captured.label = label
        return database.request(ctxt)

    async with step("heartbeat (Service.heartbeat, by id)"):
        service = await Service.get_by_host_and_binary(ctxt, "sim-00042", BINARY_COMPUTE)
        await service.heartbeat()
    async with step("batched heartbeat (report_alive)"):
        # The real batch (conductor/liveness.py): 50 hosts in one UPDATE ... RETURNING.
        batcher = LivenessBatcher(database, max_delay=0.01)
        await asyncio.gather(*(batcher.beat(h) for h in sim.host_names(HOSTS)[100:150]))
        await batcher.stop()
        assert batcher.flushes == 1
    async with step("compute node save (by id)"):
        node = await ComputeNode.get_by_host_and_nodename(ctxt, "sim-00007", "sim-00007")
        node.vcpus_used = 3
        await node.save()
    view = HostView(HostViewSettings(refresh_interval=0.0, full_refresh_interval=3600.0))
    async with step("host view full read"):
        await view.fleet(ctxt)
    async with step("host view delta"):
        await view.fleet(ctxt)
    assert view.stats.delta_reads == 1 and view.stats.last_ageing >= 20
    async with step("instance get_by_uuid"):
        some = await InstanceList.get_by_host(ctxt, "sim-00003")
        assert len(some) == INSTANCES // HOSTS
        await Instance.get_by_uuid(ctxt, some[0].uuid)
    async with step("instance list by host"):
        await InstanceList.get_by_host(ctxt, "sim-00004")
    older = now - datetime.timedelta(seconds=60)
    async with step("reconciler compute services"):
        assert ctxt.db is not None
        assert len(await reconcile.compute_services(ctxt.db)) == HOSTS
    async with step("reconciler transitional instances"):
        found = await reconcile.transitional_instances(ctxt.db, older_than=older, limit=200)
        assert 0 < len(found) <= INSTANCES // 200
    async with step("reconciler stale migrations"):
        await reconcile.stale_migrations(
            ctxt.db, statuses=["queued", "running"], older_than=older, limit=200
        )
    async with step("reconciler open actions"):
        await reconcile.open_actions(ctxt.db, older_than=older, limit=200)


# Statements that list every compute host: a sequential scan is the right plan for them.
FULL_LISTINGS = {"host view full read", "reconciler compute services"}


async def test_hot_statements_use_indexes_at_1000_hosts_and_10000_instances(
    loaded: tuple[Database, Captured], pg_database_url: str
) -> None:
    database, captured = loaded
    await _run_hot_paths(database, captured)
    conn = await asyncpg.connect(pg_database_url.replace("postgresql+asyncpg", "postgresql"))
    plans: dict[str, list[str]] = {}
    natural: dict[str, list[str]] = {}
    try:
        for label, statement, params in captured.statements:
            if not statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
                continue
            rows = await conn.fetch("EXPLAIN " + statement, *(params or ()))
            natural.setdefault(label, []).append("\n".join(r[0] for r in rows))
        # Can an index serve it? With sequential scans priced out, a plan that still scans a
        # table has no index to use. (At a thousand rows the planner may rightly prefer to
        # read the services table's few pages for a statement touching many hosts.)
        await conn.execute("SET enable_seqscan = off")
        for label, statement, params in captured.statements:
            if not statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
                continue
            rows = await conn.fetch("EXPLAIN " + statement, *(params or ()))
            plans.setdefault(label, []).append("\n".join(r[0] for r in rows))
    finally:
        await conn.close()
    assert set(plans) >= {
        "heartbeat (Service.heartbeat, by id)",
        "batched heartbeat (report_alive)",
        "compute node save (by id)",
        "host view delta",
        "instance get_by_uuid",
        "instance list by host",
        "reconciler transitional instances",
        "reconciler open actions",
    }, sorted(plans)
    offenders = {
        label: plan
        for label, found in plans.items()
        if label not in FULL_LISTINGS
        for plan in found
        if WATCHED.search(plan)
    }
    assert not offenders, "\n\n".join(f"{k}:\n{v}" for k, v in offenders.items())
    unhelped = {
        label: plan
        for label, found in natural.items()
        if label not in FULL_LISTINGS
        for plan in found
        if WATCHED_NATURAL.search(plan)
    }
    assert not unhelped, "\n\n".join(f"{k}:\n{v}" for k, v in unhelped.items())
    # The reconciler's scans use the partial indexes of migration 0004.
    joined = {label: "\n".join(found) for label, found in plans.items()}
    assert "ix_instances_busy_changed" in joined["reconciler transitional instances"]
    assert "ix_instance_actions_open" in joined["reconciler open actions"]
    assert "ix_compute_nodes_changed_at" in joined["host view delta"]
    assert "ix_services_changed_at" in joined["host view delta"]
    # The beat's "does a live migration from this host wait" probe is an index lookup.
    assert "ix_migrations_source_compute_status" in joined["batched heartbeat (report_alive)"]
