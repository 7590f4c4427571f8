"""Object persistence through the conductor, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest
from sqlalchemy import event, update

from conductor.db import models
from conductor.db.api import DbApi
from conductor.db.where import UnindexedQuery
from conductor.testing import LocalConductor, snapshot
from shared_objects import exception, fields
from shared_objects.context import RequestContext
from shared_objects.objects import (
    BlockDeviceMapping,
    BlockDeviceMappingList,
    ComputeNode,
    ComputeNodeList,
    Flavor,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    InstanceFault,
    InstanceList,
    Migration,
    MigrationList,
    SecurityGroup,
    SecurityGroupList,
    SecurityGroupRule,
    SecurityGroupRuleList,
    Service,
)

pytestmark = pytest.mark.integration


async def _flavor(ctxt: RequestContext, name: str = "m1.small") -> Flavor:
    flavor = Flavor(ctxt, name=name, vcpus=2, memory_mb=2048, root_gb=20)
    await flavor.create()
    return flavor


async def _instance(ctxt: RequestContext, flavor: Flavor, **kw: Any) -> Instance:
    values: dict[str, Any] = {"name": "vm", "host": "h1", "node": "n1", "vm_state": "building"}
    values.update(kw)
    inst = Instance(ctxt, flavor=flavor, **values)
    await inst.create()
    return inst


async def test_flavor_create_get_and_duplicate(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    flavor = await _flavor(ctxt)
    assert flavor.id > 0 and flavor.flavorid == "m1.small" and flavor.extra_specs == {}
    got = await Flavor.get_by_flavor_id(ctxt, "m1.small")
    assert (got.id, got.vcpus, got.memory_mb) == (flavor.id, 2, 2048)
    assert (await Flavor.get_by_name(ctxt, "m1.small")).id == flavor.id
    with pytest.raises(exception.ObjectAlreadyExists):
        await Flavor(ctxt, name="m1.small", vcpus=1, memory_mb=1, root_gb=1).create()
    with pytest.raises(exception.FlavorNotFound):
        await Flavor.get_by_id(ctxt, 999)


async def test_instance_round_trip_with_expected_attrs(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context(user_id="u1", project_id="p1")
    flavor = await _flavor(ctxt)
    group = SecurityGroup(ctxt, name="web", project_id="p1")
    await group.create()
    inst = Instance(
        ctxt,
        name="vm",
        host="h1",
        node="n1",
        flavor=flavor,
        vm_state="building",
        security_groups=SecurityGroupList(objects=[group]),
        launch_index=0,
    )
    await inst.create()
    assert inst.vcpus == 2 and inst.memory_mb == 2048 and inst.root_gb == 20
    assert inst.created_at is not None and inst.deleted is False

    plain = await Instance.get_by_uuid(ctxt, inst.uuid)
    assert plain.name == "vm" and not plain.obj_attr_is_set("flavor")
    with pytest.raises(exception.ObjectAttributeNotLoaded):
        _ = plain.flavor
    full = await Instance.get_by_uuid(ctxt, inst.uuid, expected_attrs=["flavor", "security_groups"])
    assert full.flavor.name == "m1.small" and full.flavor.vcpus == 2
    assert [g.name for g in full.security_groups] == ["web"]
    assert full.obj_what_changed() == set()
    with pytest.raises(exception.InstanceNotFound):
        await Instance.get_by_uuid(ctxt, "3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11")


async def test_save_writes_only_changed_fields(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    inst = await _instance(ctxt, await _flavor(ctxt))
    loaded = await Instance.get_by_uuid(ctxt, inst.uuid)
    # Someone else renames the instance after we loaded it.
    async with conductor.database.engine.begin() as conn:
        await conn.execute(
            update(models.Instance).where(models.Instance.uuid == inst.uuid).values(name="renamed")
        )
    loaded.progress = 42
    await loaded.save()
    again = await Instance.get_by_uuid(ctxt, inst.uuid)
    assert again.progress == 42
    assert again.name == "renamed"  # our stale name was not written back
    assert loaded.updated_at is not None and loaded.obj_what_changed() == set()


async def test_save_is_a_compare_and_swap_on_task_and_vm_state(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    inst = await _instance(ctxt, await _flavor(ctxt))
    inst.task_state = fields.TaskState.SPAWNING
    await inst.save(expected_task_state=None, expected_vm_state=[fields.VMState.BUILDING])
    inst.task_state = None
    with pytest.raises(exception.UnexpectedTaskStateError) as info:
        await inst.save(expected_task_state=[fields.TaskState.DELETING, None])
    assert info.value.kwargs["actual"] == "spawning"
    with pytest.raises(exception.UnexpectedVMStateError):
        inst.vm_state = fields.VMState.ACTIVE
        await inst.save(expected_task_state="spawning", expected_vm_state="active")
    current = await Instance.get_by_uuid(ctxt, inst.uuid)
    assert (current.task_state, current.vm_state) == ("spawning", "building")
    current.task_state = None
    current.vm_state = "active"
    await current.save(expected_task_state="spawning")
    final = await Instance.get_by_uuid(ctxt, inst.uuid)
    assert (final.task_state, final.vm_state) == (None, "active")


async def test_twenty_concurrent_cas_saves_exactly_one_wins(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    inst = await _instance(ctxt, await _flavor(ctxt))
    copies = [await Instance.get_by_uuid(ctxt, inst.uuid) for _ in range(20)]
    for copy in copies:
        copy.task_state = fields.TaskState.SPAWNING

    results = await asyncio.wait_for(
        asyncio.gather(*(c.save(expected_task_state=None) for c in copies), return_exceptions=True),
        timeout=60,
    )
    wins = [r for r in results if r is None]
    losses = [r for r in results if isinstance(r, exception.UnexpectedTaskStateError)]
    assert (len(wins), len(losses)) == (1, 19), results


async def test_lists_by_host_exclude_deleted_and_load_groups_without_n_plus_1(
    conductor: LocalConductor,
) -> None:
    ctxt = conductor.agent_context(project_id="p1")
    flavor = await _flavor(ctxt)
    group = SecurityGroup(ctxt, name="g", project_id="p1")
    await group.create()
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(conductor.database.engine.sync_engine, "before_cursor_execute", count)
    try:
        selects_per_size = []
        for size in (2, 6):
            for i in range(size - len(await InstanceList.get_by_host(ctxt, "hx"))):
                await _instance(
                    ctxt,
                    flavor,
                    host="hx",
                    launch_index=i,
                    security_groups=SecurityGroupList(objects=[group]),
                )
            statements.clear()
            listed = await InstanceList.get_by_host(
                ctxt, "hx", expected_attrs=["flavor", "security_groups"]
            )
            assert len(listed) == size
            assert all(i.flavor.name == "m1.small" and len(i.security_groups) == 1 for i in listed)
            selects_per_size.append(len(statements))
        assert selects_per_size[0] == selects_per_size[1] <= 3
    finally:
        event.remove(conductor.database.engine.sync_engine, "before_cursor_execute", count)

    victim = listed[0]
    await victim.destroy()
    assert victim.deleted is True and victim.deleted_at is not None
    remaining = await InstanceList.get_by_host(ctxt, "hx")
    assert victim.uuid not in {i.uuid for i in remaining} and len(remaining) == 5
    still = await Instance.get_by_uuid(ctxt, victim.uuid)  # soft: the row is kept
    assert still.deleted is True
    by_node = await InstanceList.get_by_host_and_node(ctxt, "hx", "n1")
    assert len(by_node) == 5
    by_uuid = await InstanceList.get_by_uuids(ctxt, [remaining[0].uuid, victim.uuid])
    assert len(by_uuid) == 2


async def test_service_register_heartbeat_and_minimum_version(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    first = await Service.register(ctxt, "h1", "fleet-compute", "compute", 3)
    again = await Service.register(ctxt, "h1", "fleet-compute", "compute", 4)
    assert again.id == first.id and again.version == 4
    before = again.last_seen_up
    await again.heartbeat()
    assert again.report_count == 1 and again.last_seen_up >= before and again.is_up
    await Service.register(ctxt, "h2", "fleet-compute", "compute", 2)
    old = await Service.register(ctxt, "h3", "fleet-compute", "compute", 1)
    assert await Service.get_minimum_version(ctxt, "fleet-compute") == 1
    old.forced_down = True
    await old.save()
    assert await Service.get_minimum_version(ctxt, "fleet-compute") == 2
    # A service whose heartbeat is too old no longer counts.
    async with conductor.database.engine.begin() as conn:
        stale = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=600)
        await conn.execute(
            update(models.Service).where(models.Service.host == "h2").values(last_seen_up=stale)
        )
    assert await Service.get_minimum_version(ctxt, "fleet-compute") == 4
    stale_svc = await Service.get_by_host_and_binary(ctxt, "h2", "fleet-compute")
    assert not stale_svc.is_up
    assert await Service.get_minimum_version(ctxt, "fleet-nothing") == 0


async def test_migration_progress_and_in_progress_lookup(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    inst = await _instance(ctxt, await _flavor(ctxt))
    mig = Migration(
        ctxt,
        instance_uuid=inst.uuid,
        source_compute="h1",
        dest_compute="h2",
        source_node="n1",
        dest_node="n2",
        status=fields.MigrationStatus.ACCEPTED,
        migration_type=fields.MigrationType.LIVE_MIGRATION,
    )
    await mig.create()
    mig.status = fields.MigrationStatus.RUNNING
    mig.memory_total, mig.memory_processed, mig.memory_remaining = 1000, 400, 600
    await mig.save()
    got = await Migration.get_by_uuid(ctxt, mig.uuid)
    assert (got.status, got.memory_processed, got.memory_remaining) == ("running", 400, 600)
    assert [m.id for m in await MigrationList.get_in_progress_by_host(ctxt, "h2")] == [mig.id]
    assert [m.id for m in await MigrationList.get_in_progress_by_host(ctxt, "h1")] == [mig.id]
    got.status = fields.MigrationStatus.COMPLETED
    await got.save()
    assert len(await MigrationList.get_in_progress_by_host(ctxt, "h1")) == 0
    assert len(await MigrationList.get_by_instance(ctxt, inst.uuid)) == 1


async def test_compute_node_bdm_actions_faults_and_rules(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context(project_id="p1", user_id="u1")
    node = ComputeNode(
        ctxt, host="h1", hypervisor_hostname="n1", vcpus=8, memory_mb=4096, local_gb=100
    )
    await node.create()
    node.vcpus_used = 2
    await node.save()
    got = await ComputeNode.get_by_host_and_nodename(ctxt, "h1", "n1")
    assert got.vcpus_used == 2 and got.cpu_allocation_ratio == 16.0
    assert len(await ComputeNodeList.get_all_by_host(ctxt, "h1")) == 1
    assert len(await ComputeNodeList.get_all(ctxt)) == 1

    inst = await _instance(ctxt, await _flavor(ctxt))
    bdm = BlockDeviceMapping(
        ctxt,
        instance_uuid=inst.uuid,
        volume_id="vol-1",
        source_type="volume",
        destination_type="volume",
        device_name="/dev/vdb",
    )
    await bdm.create()
    found = await BlockDeviceMapping.get_by_volume_and_instance(ctxt, "vol-1", inst.uuid)
    assert found.id == bdm.id and found.is_volume
    await found.destroy()
    assert len(await BlockDeviceMappingList.get_by_instance_uuid(ctxt, inst.uuid)) == 0

    action = await InstanceAction.action_start(ctxt, inst.uuid, "live-migrate")
    assert action.request_id == ctxt.request_id and action.user_id == "u1"
    await InstanceActionEvent.event_start(ctxt, inst.uuid, "compute_live_migration", host="h1")
    finished = await InstanceActionEvent.event_finish(
        ctxt, inst.uuid, "compute_live_migration", result="Error", traceback="tb"
    )
    assert finished.result == "Error" and finished.finish_time is not None
    done = await InstanceAction.action_finish(ctxt, inst.uuid)
    assert done.finish_time is not None

    fault = InstanceFault(ctxt, instance_uuid=inst.uuid, code=500, message="boom", host="h1")
    await fault.create()
    assert (await InstanceFault.get_latest_for_instance(ctxt, inst.uuid)).message == "boom"

    group = SecurityGroup(ctxt, name="db", project_id="p1")
    await group.create()
    rule = SecurityGroupRule(
        ctxt,
        parent_group_id=group.id,
        protocol="tcp",
        from_port=5432,
        to_port=5432,
        cidr="10.0.0.0/8",
    )
    await rule.create()
    inst.security_groups = SecurityGroupList(objects=[group])
    await inst.save()
    rules = await SecurityGroupRuleList.get_by_instance(ctxt, inst.uuid)
    assert [(r.protocol, r.from_port) for r in rules] == [("tcp", 5432)]
    groups = await SecurityGroupList.get_by_instance(ctxt, inst.uuid)
    assert [g.name for g in groups] == ["db"]
    assert [g.name for g in await SecurityGroupList.get_by_project(ctxt, "p1")] == ["db"]


async def test_queries_without_an_index_are_refused(conductor: LocalConductor) -> None:
    before = await snapshot(conductor.database)
    async with conductor.database.request(RequestContext()) as db:
        assert isinstance(db, DbApi)
        with pytest.raises(UnindexedQuery):
            await db.get("instances", {"name": "vm"})
        with pytest.raises(UnindexedQuery):
            await db.update("instances", {"image_ref": "x"}, {"name": "y"})
        assert await db.select("instances", {"deleted": False}) == []
    assert await snapshot(conductor.database) == before


async def test_constraint_violations_become_a_clear_conflict(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    flavor = await _flavor(ctxt)
    inst = await _instance(ctxt, flavor)
    twin = Instance(ctxt, uuid=inst.uuid, name="twin", flavor=flavor, vm_state="building")
    with pytest.raises(exception.DatabaseConflict, match="instances"):
        await twin.create()
    rule = SecurityGroupRule(ctxt, parent_group_id=987654, protocol="tcp")
    with pytest.raises(exception.DatabaseConflict, match="security_group_rules"):
        await rule.create()
    # The failed requests left nothing behind and the conductor still serves.
    assert len(await InstanceList.get_by_host(ctxt, "h1")) == 1


async def test_conductor_side_units_of_work_stay_atomic(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    inst = await _instance(ctxt, await _flavor(ctxt))
    with pytest.raises(RuntimeError, match="after the save"):
        async with conductor.db_context() as local:
            mine = await Instance.get_by_uuid(local, inst.uuid)
            mine.progress = 77
            await mine.save()  # a standalone write is NOT committed alone outside an RPC call
            raise RuntimeError("failure after the save")
    assert (await Instance.get_by_uuid(ctxt, inst.uuid)).progress is None


async def test_dead_pooled_connections_are_replaced_without_failing_requests(
    pg_database_url: str,
) -> None:
    import os

    import asyncpg
    from sqlalchemy.engine import make_url

    from conductor.testing import local_conductor

    admin_dsn = os.environ.get(
        "FLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    async with local_conductor(pg_database_url) as local:
        ctxt = local.agent_context()
        inst = await _instance(ctxt, await _flavor(ctxt))
        await asyncio.gather(*(Instance.get_by_uuid(ctxt, inst.uuid) for _ in range(8)))
        # Kill every server connection of this (test-only) database: the pool now holds
        # only dead connections, as after a PostgreSQL restart.
        admin = await asyncpg.connect(admin_dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                make_url(pg_database_url).database,
            )
        finally:
            await admin.close()
        assert killed >= 1
        got = await Instance.get_by_uuid(ctxt, inst.uuid)
        got.progress = 5
        await got.save()
        copies = await asyncio.gather(*(Instance.get_by_uuid(ctxt, inst.uuid) for _ in range(8)))
        assert all(c.progress == 5 for c in copies)


async def test_nested_units_of_work_on_sqlite_fail_fast_instead_of_hanging(
    sqlite_database_url: str,
) -> None:
    from conductor.db import migration
    from conductor.db.session import Database

    await migration.upgrade(sqlite_database_url)
    database = Database(sqlite_database_url)
    try:
        async with asyncio.timeout(10), database.request(RequestContext()):
            with pytest.raises(RuntimeError, match="nested"):
                async with database.request(RequestContext()):
                    pass
        # The lock was released: a later unit works.
        async with asyncio.timeout(10), database.request(RequestContext()) as db:
            assert await db.select("instances", {"deleted": False}) == []
    finally:
        await database.dispose()


async def test_a_task_started_inside_a_sqlite_unit_waits_for_it(sqlite_database_url: str) -> None:
    from conductor.db import migration
    from conductor.db.session import Database

    await migration.upgrade(sqlite_database_url)
    database = Database(sqlite_database_url)
    order: list[str] = []

    async def later() -> None:
        async with database.request(RequestContext()):
            order.append("child")

    try:
        async with asyncio.timeout(10):
            async with database.request(RequestContext()):
                child = asyncio.create_task(later())
                await asyncio.sleep(0.05)  # an absence check: the child gets its chance to cut in
                order.append("parent")
            await child
        assert order == ["parent", "child"]
    finally:
        await database.dispose()


async def test_concurrent_heartbeats_count_every_report(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    service = await Service.register(ctxt, "hb", "fleet-compute", "compute", 1)
    copies = [await Service.get_by_id(ctxt, service.id) for _ in range(10)]
    await asyncio.wait_for(asyncio.gather(*(c.heartbeat() for c in copies)), timeout=60)
    assert sorted(c.report_count for c in copies) == list(range(1, 11))
    assert (await Service.get_by_id(ctxt, service.id)).report_count == 10
