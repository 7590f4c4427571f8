"""Recovery at agent start: finish or fail what a crash interrupted, then trust the hypervisor.

Builds interrupted mid-way end ACTIVE when the hypervisor has the guest running, ERROR with a
fault otherwise (and any half-built guest is removed). Deletes interrupted mid-way are finished.
Guests of instances the database places elsewhere are left alone while a migration names this
host (the migration recovery owns them); the others are handled as below.

Builds assigned here but still ``scheduling`` were never taken (or were handed back): their row
is the conductor's (a queued run_instance takes it, or the reconciler casts it again or moves
it), so recovery leaves the row alone and only removes a guest a handed-back build left behind.
Every write is a compare-and-swap on the task state recovery read, so a conductor that moved
the instance meanwhile wins; calls ride out an outage with the agent's retrier.

Guests the conductor's reconciler left behind while this host was down (issue 13) are removed,
each only after a fresh read of its row, batched (``InstanceList.get_by_uuids``, which also
returns soft-deleted rows, under this agent's ownership scope):

* an instance of this host in ERROR that never launched (``launched_at`` None, no task): its
  build was failed (``spawn_host_down``, or this agent's own hand-back) and never finished, so
  the guest holds nothing anyone asked for;
* a soft-deleted instance (``delete_host_down`` finished the delete): every copy is garbage;
* an instance the database places on another host, with no migration naming this host (the
  build was moved, ``build_host_down``): the scope hides such a row, so only these few guests
  are looked up one by one, and the conductor's ``Forbidden`` answer (the row exists, it is
  not ours) is what says so.

A guest with no row at all is left running and logged at ERROR
(``recovery_guest_without_instance``): an empty, restored or wrong database must never make an
agent wipe its host; the operator removes it. No claim is taken for a removed guest (claims
are computed from the rows after recovery).
"""

from __future__ import annotations

import datetime

import structlog

from compute_agent.transient import Retrier, is_not_found
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import VirtError
from compute_agent.virt.models import GuestPhase, HasUUID, InstanceInfo
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import PowerState, TaskState, VMState
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_fault import InstanceFault

log = structlog.get_logger(__name__)

BUILD_TASKS = frozenset({TaskState.SCHEDULING, TaskState.BLOCK_DEVICE_MAPPING, TaskState.SPAWNING})


async def _fail_build(
    ctxt: RequestContext,
    driver: ComputeDriver,
    host: str,
    instance: Instance,
    why: str,
    calls: Retrier,
) -> None:
    try:
        await driver.destroy(instance)
    except VirtError:
        log.exception("recovery_destroy_failed", instance_uuid=instance.uuid)
    was = instance.task_state
    instance.vm_state = VMState.ERROR
    instance.task_state = None
    instance.power_state = PowerState.NOSTATE
    await calls.save(ctxt, "recovery error", instance, [was])
    await calls.call(
        "recovery fault",
        InstanceFault(
            ctxt, instance_uuid=instance.uuid, code=500, message=why[:255], host=host
        ).create,
        instance_uuid=instance.uuid,
    )
    log.warning("recovery_build_failed", instance_uuid=instance.uuid, reason=why)


async def _recover_build(
    ctxt: RequestContext,
    driver: ComputeDriver,
    host: str,
    instance: Instance,
    guest: InstanceInfo | None,
    calls: Retrier,
) -> None:
    if guest is not None and guest.phase is GuestPhase.RUNNING:
        was = instance.task_state
        instance.vm_state = VMState.ACTIVE
        instance.task_state = None
        instance.power_state = PowerState.RUNNING
        if instance.launched_at is None:
            instance.launched_at = datetime.datetime.now(datetime.UTC)
        await calls.save(ctxt, "recovery active", instance, [was])
        log.info("recovery_build_completed", instance_uuid=instance.uuid)
        return
    state = guest.phase.value if guest is not None else "absent"
    await _fail_build(
        ctxt,
        driver,
        host,
        instance,
        f"The compute agent on {host} restarted while building this instance "
        f"(guest {state} in the hypervisor)",
        calls,
    )


async def _recover_delete(
    ctxt: RequestContext, driver: ComputeDriver, instance: Instance, calls: Retrier
) -> None:
    await driver.destroy(instance)
    instance.vm_state = VMState.DELETED
    instance.task_state = None
    await calls.save(ctxt, "recovery deleted", instance, [TaskState.DELETING])
    await calls.write(
        "recovery destroy",
        instance.destroy,
        done_if=is_not_found,
        instance_uuid=instance.uuid,
    )
    log.info("recovery_delete_completed", instance_uuid=instance.uuid)


async def recover_instances(
    ctxt: RequestContext, host: str, driver: ComputeDriver, calls: Retrier | None = None
) -> list[Instance]:
    """Reconcile the instances placed on ``host``; returns them as they are afterwards."""
    calls = calls if calls is not None else Retrier()
    instances = await calls.call("recovery list", lambda: InstanceList.get_by_host(ctxt, host))
    guests = {g.uuid: g for g in await driver.list_guests()}
    survivors: list[Instance] = []
    for instance in instances:
        guest = guests.get(instance.uuid)
        if instance.task_state == TaskState.SCHEDULING:
            # Assigned here but not taken yet: its run_instance is still queued for this agent,
            # or it was handed back for a reschedule, or the cast was lost (acknowledged before
            # a crash): the conductor's reconciler casts it again or moves it. The row is not
            # ours to change; a guest left by a handed-back attempt is.
            if guest is not None:
                await _remove_leftover_guest(driver, instance)
            log.info("recovery_build_not_taken_yet", instance_uuid=instance.uuid)
            continue
        try:
            if instance.vm_state == VMState.BUILDING or instance.task_state in BUILD_TASKS:
                await _recover_build(ctxt, driver, host, instance, guest, calls)
            elif instance.task_state == TaskState.DELETING:
                await _recover_delete(ctxt, driver, instance, calls)
                continue
            elif instance.vm_state == VMState.ACTIVE and guest is None:
                log.error("recovery_guest_missing", instance_uuid=instance.uuid)
        except exception.FleetException:
            log.exception("recovery_failed", instance_uuid=instance.uuid)
        survivors.append(instance)
    known = {i.uuid for i in instances}
    never_launched = {
        i.uuid
        for i in instances
        if i.uuid in guests
        and i.vm_state == VMState.ERROR
        and i.task_state is None
        and i.launched_at is None
    }
    unknown = {uuid: guests[uuid] for uuid in guests if uuid not in known}
    if never_launched or unknown:
        await _remove_abandoned_guests(ctxt, host, driver, never_launched, unknown, calls)
    return survivors


async def _remove_abandoned_guests(
    ctxt: RequestContext,
    host: str,
    driver: ComputeDriver,
    never_launched: set[str],
    unknown: dict[str, InstanceInfo],
    calls: Retrier,
) -> None:
    """Remove the guests the rows say nobody wants (see the module docstring); one fresh
    batched read decides, just before the destroy."""
    wanted = sorted(never_launched | set(unknown))
    rows = {
        i.uuid: i
        for i in await calls.call(
            "recovery reread", lambda: InstanceList.get_by_uuids(ctxt, wanted)
        )
    }
    for uuid in wanted:
        row = rows.get(uuid)
        if row is None:
            await _unreadable_guest(ctxt, driver, uuid, unknown[uuid], calls)
        elif row.deleted:
            await _remove_guest(driver, row, "recovery_deleted_instance_guest_removed")
        elif row.host != host:
            # Readable though elsewhere: a migration names this host; its recovery decides.
            continue
        elif row.vm_state == VMState.ERROR and row.task_state is None and row.launched_at is None:
            await _remove_guest(driver, row, "recovery_unfinished_build_guest_removed")


async def _unreadable_guest(
    ctxt: RequestContext, driver: ComputeDriver, uuid: str, guest: InstanceInfo, calls: Retrier
) -> None:
    """A guest whose row this host may not read: another host's instance, or no row at all."""
    try:
        row = await calls.call("recovery probe", lambda: Instance.get_by_uuid(ctxt, uuid))
    except exception.Forbidden:
        # The row exists and is another host's, with no migration naming this host.
        await _remove_guest(driver, _Guest(uuid), "recovery_foreign_guest_removed")
        return
    except exception.InstanceNotFound:
        log.error(
            "recovery_guest_without_instance",
            instance_uuid=uuid,
            phase=guest.phase.value,
            action="left running; remove it by hand if it is not wanted",
        )
        return
    # Readable now (it moved here, or a migration naming this host began meanwhile).
    log.info("recovery_guest_row_changed", instance_uuid=uuid, host=row.host)


async def _remove_guest(driver: ComputeDriver, instance: HasUUID, event: str) -> None:
    try:
        await driver.destroy(instance)
    except VirtError:
        log.exception("recovery_destroy_failed", instance_uuid=instance.uuid)
        return
    log.warning(event, instance_uuid=instance.uuid)


class _Guest:
    """What ``driver.destroy`` needs of an instance: its uuid."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid


async def _remove_leftover_guest(driver: ComputeDriver, instance: Instance) -> None:
    try:
        await driver.destroy(instance)
    except VirtError:
        log.exception("recovery_destroy_failed", instance_uuid=instance.uuid)
        return
    log.warning("recovery_leftover_guest_removed", instance_uuid=instance.uuid)
