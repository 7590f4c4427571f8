"""The ownership scope through a live migration (issue 11): its destination may take the instance,
its hosts may finish its records afterwards, a settled migration moves nothing.
"""

from __future__ import annotations

import pytest
from ownership_world import H1, H2, H3, World, _create, refused

from conductor.db.ownership import ACTIVE_MIGRATION_STATUSES, MOVABLE_MIGRATION_STATUSES
from shared_objects import exception
from shared_objects.fields import MigrationStatus, TaskState, VMState
from shared_objects.objects import (
    Instance,
    InstanceAction,
    InstanceActionEvent,
    InstanceFault,
    MigrationList,
)

pytestmark = pytest.mark.integration


async def test_host_changes_only_to_its_own_migrations_destination(world: World) -> None:
    """Source side: ``host`` may become the destination of the instance's latest migration,
    while the instance is migrating; nowhere else, never without a migration."""
    inst = await world.instance(H1)
    inst.host = H2
    await refused(world, lambda c: inst.save(), inst)  # no migration at all
    old = await world.migration(inst, H1, H3, MigrationStatus.FAILED)
    await world.migration(inst, H1, H2, MigrationStatus.RUNNING)
    inst = await world.reload(inst)
    inst.host = H2
    await refused(world, lambda c: inst.save(), inst)  # migration, but the instance is idle
    inst = await world.reload(inst)
    inst.task_state = TaskState.MIGRATING
    await world.agent(H1)(lambda c: inst.save(expected_task_state=[None]), inst)
    for wrong in (H3, "elsewhere"):  # an older migration's destination; no migration's
        inst.host = wrong
        await refused(world, lambda c: inst.save(expected_task_state=[TaskState.MIGRATING]), inst)
    # The older migration's destination is no peer any more.
    await refused(world, lambda c: Instance.get_by_uuid(c, inst.uuid), host=H3)
    assert [
        m.id for m in await world.agent(H3)(lambda c: MigrationList.get_by_instance(c, inst.uuid))
    ] == [old.id]
    inst.host = H2
    inst.node = H2
    inst.task_state = None
    await world.agent(H1)(lambda c: inst.save(expected_task_state=[TaskState.MIGRATING]), inst)
    assert (await world.reload(inst)).host == H2


async def test_the_destination_reads_saves_and_takes_the_instance(world: World) -> None:
    """Destination side: during an active migration it reads and saves the source's instance
    and, at the switch-over, moves it to itself; it may not destroy it or hand it back."""
    inst = await world.instance(H2, task_state=TaskState.MIGRATING)
    await world.agent(None)(lambda c: InstanceAction.action_start(c, inst.uuid, "live-migration"))
    migration = await world.migration(inst, H2, H1, MigrationStatus.POST_MIGRATING)
    agent = world.agent(H1)
    current = await agent(lambda c: Instance.get_by_uuid(c, inst.uuid))
    assert current.host == H2
    current.progress = 90
    await agent(lambda c: current.save(expected_task_state=[TaskState.MIGRATING]), current)
    await agent(lambda c: InstanceActionEvent.event_start(c, inst.uuid, "compute_post", H1))
    assert [m.id for m in await agent(lambda c: MigrationList.get_in_progress_by_host(c, H1))] == [
        migration.id
    ]
    current = await agent(lambda c: Instance.get_by_uuid(c, inst.uuid))
    await refused(world, lambda c: current.destroy(), current)
    current.host = None
    await refused(world, lambda c: current.save(), current)
    current = await agent(lambda c: Instance.get_by_uuid(c, inst.uuid))
    current.host = H3  # not this migration's destination
    await refused(world, lambda c: current.save(), current)
    current = await agent(lambda c: Instance.get_by_uuid(c, inst.uuid))
    current.host, current.node = H1, H1
    current.task_state = None
    current.vm_state = VMState.ACTIVE
    await agent(lambda c: current.save(expected_task_state=[TaskState.MIGRATING]), current)
    assert (await world.reload(inst)).host == H1
    # A third host never was part of it.
    await refused(world, lambda c: Instance.get_by_uuid(c, inst.uuid), host=H3)


async def test_after_a_migration_its_hosts_may_finish_its_records_but_not_write_the_instance(
    world: World,
) -> None:
    inst = await world.instance(H1)
    await world.agent(None)(lambda c: InstanceAction.action_start(c, inst.uuid, "live-migration"))
    migration = await world.migration(inst, H2, H1, MigrationStatus.COMPLETED)
    source = world.agent(H2)
    # The source finishes the action and records faults after the switch-over...
    done = await source(lambda c: InstanceAction.action_finish(c, inst.uuid))
    assert done.finish_time is not None
    await source(
        lambda c: _create(InstanceFault(c, instance_uuid=inst.uuid, code=500, message="late"))
    )
    # ... and its recovery may still look at the instance, but no longer change it.
    current = await source(lambda c: Instance.get_by_uuid(c, inst.uuid))
    current.task_state = TaskState.MIGRATING
    await refused(world, lambda c: current.save(), current, host=H2)
    # A finished migration cannot be reopened to get the instance back.
    migration.status = MigrationStatus.RUNNING
    await refused(world, lambda c: migration.save(), migration, host=H2)
    # Finished to finished is recovery's business.
    failed = await world.migration(inst, H1, H3, MigrationStatus.ERROR)
    failed.status = MigrationStatus.COMPLETED
    await world.agent(H3)(lambda c: failed.save(), failed)
    # Until then the older migration's source is out.
    await refused(world, lambda c: Instance.get_by_uuid(c, inst.uuid), host=H2)


@pytest.mark.parametrize(
    "status", [MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED]
)
async def test_a_settled_migration_moves_nothing(world: World, status: str) -> None:
    """Even with the instance (re)marked ``migrating`` by its owner, a settled latest migration
    does not let the instance switch to that migration's destination."""
    inst = await world.instance(H1, task_state=TaskState.MIGRATING)
    await world.migration(inst, H1, H2, status)
    inst.host = H2
    inst.obj_reset_changes(["task_state"])
    await refused(world, lambda c: inst.save(expected_task_state=[TaskState.MIGRATING]), inst)
    stale = await world.reload(inst)
    stale.host = H2
    await refused(
        world,
        lambda c: stale.save(expected_task_state=[TaskState.MIGRATING]),
        stale,
        host=H2,
    )


async def test_an_unsettled_migration_stays_writable_for_both_hosts(world: World) -> None:
    """A migration marked ``error`` while the instance is still ``migrating`` (the source could
    not reach the destination) is settled later by either host's recovery."""
    inst = await world.instance(H2, task_state=TaskState.MIGRATING)
    await world.migration(inst, H2, H1, MigrationStatus.ERROR)
    dest = world.agent(H1)
    current = await dest(lambda c: Instance.get_by_uuid(c, inst.uuid))
    current.host, current.node, current.task_state = H1, H1, None
    await dest(lambda c: current.save(expected_task_state=[TaskState.MIGRATING]), current)
    await dest(
        lambda c: _create(InstanceFault(c, instance_uuid=inst.uuid, code=500, message="settled"))
    )
    # Settled: the old source's own compare-and-swap now fails as a conflict, not a refusal.
    stale = await world.agent(H2)(lambda c: Instance.get_by_uuid(c, inst.uuid))
    stale.task_state = None
    with pytest.raises(exception.UnexpectedTaskStateError):
        await world.agent(H2)(
            lambda c: stale.save(expected_task_state=[TaskState.MIGRATING]), stale
        )


async def test_active_statuses_are_the_unfinished_ones() -> None:
    assert set(ACTIVE_MIGRATION_STATUSES) == set(MigrationStatus.ALL) - set(
        MigrationStatus.FINISHED
    )
    assert set(MOVABLE_MIGRATION_STATUSES) - set(ACTIVE_MIGRATION_STATUSES) == {"error"}
