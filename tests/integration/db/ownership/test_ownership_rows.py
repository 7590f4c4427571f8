"""The ownership scope (issue 11): an agent's object calls touch only what is its own.

Object calls run as the indirection endpoint runs them for an agent: each in its own unit of
work (``Database.request(ctxt, single_call=True, scope=...)``) with the object layer in the
conductor. Every test runs on SQLite, on PostgreSQL through the asyncpg driver path and on
PostgreSQL through SQLAlchemy's execution. A refusal is ``Forbidden`` and leaves the database
exactly as it was (compared row by row with ``conductor.testing.snapshot``).
"""

from __future__ import annotations

from typing import Any

import pytest
from ownership_world import H1, H2, H3, NOBODY, REQ, Call, World, _create, refused

from conductor.testing import snapshot
from shared_objects import exception, releases
from shared_objects.context import RequestContext
from shared_objects.fields import MigrationStatus, TaskState, VMState
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
    ServiceList,
)

pytestmark = pytest.mark.integration


async def test_an_agent_reads_and_writes_what_is_its_own(world: World) -> None:
    agent, mine = world.agent(H1), world.mine
    inst = await agent(
        lambda c: Instance.get_by_uuid(c, mine.instance.uuid, ["flavor", "security_groups"])
    )
    assert inst.flavor.name == "small" and [g.name for g in inst.security_groups] == ["sg-h1"]
    inst.task_state = TaskState.SPAWNING
    inst.progress = 10
    await agent(lambda c: inst.save(expected_task_state=[None]), inst)
    assert (await world.reload(inst)).progress == 10
    assert [i.uuid for i in await agent(lambda c: InstanceList.get_by_host(c, H1))] == [inst.uuid]

    node = await agent(lambda c: ComputeNode.get_by_host_and_nodename(c, H1, H1))
    node.vcpus_used = 3
    await agent(lambda c: node.save(), node)
    assert [n.vcpus_used for n in await agent(lambda c: ComputeNodeList.get_all(c))] == [3]

    service = await agent(lambda c: Service.register(c, H1, releases.BINARY_COMPUTE, "compute", 2))
    assert service.id == mine.service.id and service.version == 2
    await agent(lambda c: service.heartbeat(), service)
    # Fleet-wide facts: every compute service (version negotiation), every flavor.
    computes = await agent(lambda c: ServiceList.get_by_binary(c, releases.BINARY_COMPUTE))
    assert sorted(s.host for s in computes) == [H1, H2]
    assert await agent(lambda c: Service.get_minimum_version(c, releases.BINARY_COMPUTE)) == 1
    assert (await agent(lambda c: Flavor.get_by_id(c, world.flavor.id))).name == "small"

    bdms = await agent(lambda c: BlockDeviceMappingList.get_by_instance_uuid(c, inst.uuid))
    assert [b.id for b in bdms] == [mine.bdm.id]
    bdm = bdms[0]
    bdm.connection_info = '{"driver": "fake"}'
    await agent(lambda c: bdm.save(), bdm)
    await agent(lambda c: bdm.destroy(), bdm)
    added = await agent(
        lambda c: _create(
            BlockDeviceMapping(c, instance_uuid=inst.uuid, volume_id="vol-new", device_name="x")
        )
    )
    assert added.id and not added.deleted

    await agent(lambda c: InstanceActionEvent.event_start(c, inst.uuid, "compute_y", H1))
    ended = await agent(lambda c: InstanceActionEvent.event_finish(c, inst.uuid, "compute_y"))
    assert ended.finish_time is not None and ended.result == "Success"
    action = await agent(lambda c: InstanceAction.action_finish(c, inst.uuid, message="ok"))
    assert action.id == mine.action.id and action.finish_time is not None
    started = await agent(
        lambda c: InstanceAction.action_start(c, inst.uuid, "reboot"), request_id="req-2"
    )
    assert started.instance_uuid == inst.uuid

    await agent(
        lambda c: _create(
            InstanceFault(c, instance_uuid=inst.uuid, code=500, message="again", host=H1)
        )
    )
    latest = await agent(lambda c: InstanceFault.get_latest_for_instance(c, inst.uuid))
    assert latest.message == "again"

    rules = await agent(lambda c: SecurityGroupRuleList.get_by_instance(c, inst.uuid))
    assert [r.id for r in rules] == [mine.rule.id]
    assert (await agent(lambda c: SecurityGroup.get_by_id(c, mine.group.id))).name == "sg-h1"
    assert (await agent(lambda c: SecurityGroupRule.get_by_id(c, mine.rule.id))).from_port == 22
    groups = await agent(lambda c: SecurityGroupList.get_by_instance(c, inst.uuid))
    assert [g.id for g in groups] == [mine.group.id]
    members = await agent(lambda c: InstanceList.get_by_security_group(c, mine.group.id))
    assert [i.uuid for i in members] == [inst.uuid]

    # Destroying its own instance (terminate) also retires its security group links.
    inst = await world.reload(inst)
    inst.vm_state = VMState.DELETED
    inst.task_state = None
    await agent(lambda c: inst.save(), inst)
    await agent(lambda c: inst.destroy(), inst)
    assert (await agent(lambda c: Instance.get_by_uuid(c, inst.uuid))).deleted
    assert not await agent(lambda c: SecurityGroupList.get_by_instance(c, inst.uuid))


async def test_lists_hold_only_the_agents_rows(world: World) -> None:
    agent = world.agent(H1)
    everything = await agent(lambda c: InstanceList.get_all(c))
    assert [i.uuid for i in everything] == [world.mine.instance.uuid]
    assert not await agent(lambda c: InstanceList.get_by_host(c, H2))
    assert not await agent(lambda c: InstanceList.get_by_uuids(c, [world.theirs.instance.uuid]))
    nodes = await agent(lambda c: ComputeNodeList.get_all(c))
    assert [n.host for n in nodes] == [H1]
    assert not await agent(lambda c: ComputeNodeList.get_all_by_host(c, H2))
    theirs = world.theirs.instance.uuid
    assert not await agent(lambda c: BlockDeviceMappingList.get_by_instance_uuid(c, theirs))
    assert not await agent(lambda c: SecurityGroupRuleList.get_by_instance(c, theirs))
    assert not await agent(lambda c: SecurityGroupList.get_by_instance(c, theirs))
    assert not await agent(lambda c: InstanceList.get_by_security_group(c, world.theirs.group.id))
    assert not await agent(lambda c: MigrationList.get_by_instance(c, theirs))
    # Lookups of one row (the newest action, fault) refuse like get: the row exists.
    with pytest.raises(exception.Forbidden):
        await agent(lambda c: InstanceAction.get_by_request_id(c, theirs, REQ))
    with pytest.raises(exception.Forbidden):
        await agent(lambda c: InstanceFault.get_latest_for_instance(c, theirs))
    with pytest.raises(exception.Forbidden):
        await agent(lambda c: InstanceActionEvent.event_finish(c, theirs, "compute_x"))


async def test_another_hosts_rows_are_forbidden(world: World) -> None:
    theirs = world.theirs
    uuid = theirs.instance.uuid
    await refused(world, lambda c: Instance.get_by_uuid(c, uuid))
    inst = await world.reload(theirs.instance)
    inst.task_state = TaskState.DELETING
    await refused(world, lambda c: inst.save(), inst)
    await refused(world, lambda c: inst.save(expected_task_state=[None]), inst)
    inst = await world.reload(theirs.instance)
    await refused(world, lambda c: inst.destroy(), inst)

    await refused(world, lambda c: ComputeNode.get_by_host_and_nodename(c, H2, H2))
    await refused(world, lambda c: ComputeNode.get_by_id(c, theirs.node.id))
    node = theirs.node
    node.vcpus_used = 7
    await refused(world, lambda c: node.save(), node)

    service = theirs.service
    await refused(world, lambda c: service.heartbeat(), service)
    await refused(world, lambda c: Service.register(c, H2, releases.BINARY_COMPUTE, "compute", 9))
    # Not even its own host's conductor row: an agent cannot pose as another binary.
    conductor = world.conductor_service
    await refused(world, lambda c: conductor.heartbeat(), conductor)
    await refused(world, lambda c: Service.register(c, H1, releases.BINARY_CONDUCTOR, "x", 9))

    bdm = theirs.bdm
    await refused(world, lambda c: BlockDeviceMapping.get_by_volume_and_instance(c, "vol-h2", uuid))
    bdm.connection_info = "stolen"
    await refused(world, lambda c: bdm.save(), bdm)
    await refused(world, lambda c: bdm.destroy(), bdm)

    action = theirs.action
    await refused(world, lambda c: action.finish("hijacked"), action)
    for table, row_id in (
        ("instance_actions", theirs.action.id),
        ("instance_action_events", theirs.event.id),
        ("instance_faults", theirs.fault.id),
        ("block_device_mappings", theirs.bdm.id),
    ):
        await refused(world, lambda c, t=table, i=row_id: c.db.get(t, {"id": i}))
    event_id = theirs.event.id
    await refused(
        world,
        lambda c: c.db.update(
            "instance_action_events", {"id": event_id}, {"result": "Error"}, returning=None
        ),
    )
    await refused(world, lambda c: SecurityGroup.get_by_id(c, theirs.group.id))
    await refused(world, lambda c: SecurityGroupRule.get_by_id(c, theirs.rule.id))


async def test_another_hosts_migration_is_forbidden(world: World) -> None:
    other = await world.migration(world.theirs.instance, H2, H3, MigrationStatus.RUNNING)
    await refused(world, lambda c: Migration.get_by_uuid(c, other.uuid))
    await refused(world, lambda c: Migration.get_by_id(c, other.id))
    other.status = MigrationStatus.COMPLETED
    await refused(world, lambda c: other.save(), other)
    assert not await world.agent(H1)(lambda c: MigrationList.get_in_progress_by_host(c, H2))
    listed = await world.agent(H3)(lambda c: MigrationList.get_in_progress_by_host(c, H3))
    assert [m.id for m in listed] == [other.id]


async def test_inserts_for_another_hosts_instance_are_refused_atomically(world: World) -> None:
    uuid = world.theirs.instance.uuid
    await refused(
        world,
        lambda c: _create(InstanceFault(c, instance_uuid=uuid, code=500, message="x", host=H1)),
    )
    await refused(world, lambda c: InstanceAction.action_start(c, uuid, "reboot"))
    await refused(
        world, lambda c: _create(BlockDeviceMapping(c, instance_uuid=uuid, volume_id="vol-x"))
    )
    action_id = world.theirs.action.id
    await refused(
        world,
        lambda c: InstanceActionEvent.start_under(c, action_id, "compute_z", H1),
    )
    # An instance that does not exist is nobody's.
    await refused(
        world,
        lambda c: _create(InstanceFault(c, instance_uuid=NOBODY, code=500, message="x")),
    )
    # Own instance, but a record that claims another host.
    mine = world.mine.instance.uuid
    await refused(
        world,
        lambda c: _create(InstanceFault(c, instance_uuid=mine, code=500, message="x", host=H2)),
    )
    # Compute nodes and services only for the agent's own host; never a row of another binary.
    await refused(world, lambda c: _create(ComputeNode(c, host=H2, hypervisor_hostname="n")))
    await refused(world, lambda c: _create(Service(c, host=H3, binary=releases.BINARY_COMPUTE)))
    await refused(
        world, lambda c: _create(Service(c, host=H3, binary=releases.BINARY_CONDUCTOR)), host=H3
    )
    # Never: instances, migrations, flavors, security groups and rules.
    flavor = world.flavor
    await refused(world, lambda c: _create(Instance(c, flavor=flavor, host=H1)))
    await refused(
        world,
        lambda c: _create(
            Migration(
                c,
                instance_uuid=mine,
                source_compute=H2,
                dest_compute=H1,
                status=MigrationStatus.RUNNING,
                migration_type="live-migration",
            )
        ),
    )
    await refused(world, lambda c: _create(Flavor(c, name="big", vcpus=64, memory_mb=1, root_gb=1)))
    await refused(world, lambda c: _create(SecurityGroup(c, name="x", project_id="p1")))
    group_id = world.mine.group.id
    await refused(world, lambda c: _create(SecurityGroupRule(c, parent_group_id=group_id)))


async def test_an_agent_creates_its_own_compute_node_and_service(world: World) -> None:
    agent = world.agent(H3)
    node = await agent(lambda c: _create(ComputeNode(c, host=H3, hypervisor_hostname=H3)))
    assert node.host == H3
    service = await agent(lambda c: Service.register(c, H3, releases.BINARY_COMPUTE, "compute", 1))
    assert service.host == H3 and service.report_count == 0


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("user_id", "someone"),
        ("project_id", "other"),
        ("locked", True),
        ("locked_reason", "mine now"),
        ("uuid", "8a0b5b5e-7d7e-4a43-8b43-2b2d3b7d0b1e"),
        ("vcpus", 64),
        ("name", "renamed"),
    ],
)
async def test_columns_that_grant_rights_are_refused_before_any_statement(
    world: World, column: str, value: Any
) -> None:
    agent = world.agent(H1)
    inst = await world.reload(world.mine.instance)
    setattr(inst, column, value)
    before = await snapshot(world.database)
    with pytest.raises(exception.Forbidden) as caught:
        await agent(lambda c: inst.save(), inst)
    assert agent.statements == 0
    assert column in str(caught.value)
    assert await snapshot(world.database) == before


async def test_owner_and_flag_columns_of_other_tables_are_refused(world: World) -> None:
    mine = world.mine
    node = await world.agent(None)(lambda c: ComputeNode.get_by_id(c, mine.node.id))
    node.host = H2
    await refused(world, lambda c: node.save(), node)
    service = await world.agent(None)(lambda c: Service.get_by_id(c, mine.service.id))
    service.disabled = False
    service.forced_down = False
    await refused(world, lambda c: service.save(), service)
    own = await world.migration(mine.instance, H1, H2, MigrationStatus.RUNNING)
    own.dest_compute = H3
    await refused(world, lambda c: own.save(), own)
    bdm = mine.bdm
    bdm.instance_uuid = world.theirs.instance.uuid
    await refused(world, lambda c: bdm.save(), bdm)
    # A deleted row stays deleted.
    instance_uuid = mine.instance.uuid
    await refused(
        world,
        lambda c: c.db.update("instances", {"uuid": instance_uuid}, {"deleted": False}),
    )
    # No agent deletes rows.
    await refused(world, lambda c: c.db.delete("instance_faults", {"id": mine.fault.id}))


async def test_a_failed_compare_and_swap_on_an_own_row_is_still_a_conflict(world: World) -> None:
    agent = world.agent(H1)
    inst = await world.reload(world.mine.instance)
    inst.task_state = TaskState.SPAWNING
    with pytest.raises(exception.UnexpectedTaskStateError):
        await agent(lambda c: inst.save(expected_task_state=[TaskState.SCHEDULING]), inst)
    with pytest.raises(exception.UnexpectedVMStateError):
        await agent(
            lambda c: inst.save(expected_task_state=[None], expected_vm_state=VMState.ERROR), inst
        )
    gone = await world.instance(H1)
    gone.obj_reset_changes()
    await world.agent(None)(lambda c: gone.destroy(), gone)
    gone.deleted = False
    gone.obj_reset_changes()
    with pytest.raises(exception.InstanceNotFound):
        await agent(lambda c: gone.destroy(), gone)


async def test_a_scoped_call_runs_as_many_statements_as_an_unscoped_one(world: World) -> None:
    mine = world.mine
    uuid = mine.instance.uuid
    calls: list[tuple[str, Call, list[Any]]] = []

    def add(name: str, call: Call, *objects: Any) -> None:
        calls.append((name, call, list(objects)))

    inst = await world.reload(mine.instance)
    add("get", lambda c: Instance.get_by_uuid(c, uuid))
    add("get+groups", lambda c: Instance.get_by_uuid(c, uuid, ["flavor", "security_groups"]))
    add("list", lambda c: InstanceList.get_by_host(c, H1, ["security_groups"]))

    async def save(c: RequestContext) -> None:
        inst.progress = (inst.progress or 0) + 1
        await inst.save(expected_task_state=[None])

    add("save", save, inst)
    node = mine.node

    async def node_save(c: RequestContext) -> None:
        node.vcpus_used += 1
        await node.save()

    add("node save", node_save, node)
    service = mine.service
    add("heartbeat", lambda c: service.heartbeat(), service)
    add("register", lambda c: Service.register(c, H1, releases.BINARY_COMPUTE, "compute", 1))
    add("bdms", lambda c: BlockDeviceMappingList.get_by_instance_uuid(c, uuid))
    add("rules", lambda c: SecurityGroupRuleList.get_by_instance(c, uuid))
    add("event start", lambda c: InstanceActionEvent.event_start(c, uuid, "compute_q", H1))
    add("event finish", lambda c: InstanceActionEvent.event_finish(c, uuid, "compute_q"))
    add("action finish", lambda c: InstanceAction.action_finish(c, uuid))
    add(
        "fault",
        lambda c: _create(InstanceFault(c, instance_uuid=uuid, code=1, message="m", host=H1)),
    )
    add("versions", lambda c: ServiceList.get_by_binary(c, releases.BINARY_COMPUTE))
    counts: dict[str, tuple[int, int]] = {}
    for name, call, objects in calls:
        scoped, unscoped = world.agent(H1), world.agent(None)
        await unscoped(call, *objects)
        await scoped(call, *objects)
        counts[name] = (scoped.statements, unscoped.statements)
    assert all(s == u for s, u in counts.values()), counts
    assert counts["save"] == (1, 1) and counts["get"] == (1, 1), counts
