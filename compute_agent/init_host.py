"""Recovery at agent start: finish or fail what a crash interrupted, then trust the hypervisor.

Builds interrupted mid-way end ACTIVE when the hypervisor has the guest running, ERROR with a
fault otherwise (and any half-built guest is removed). Deletes interrupted mid-way are finished.
Guests the hypervisor has for instances the database does not place here are reported, not
touched: they may be the other half of a live migration, which the migration recovery owns.

Builds assigned here but still ``scheduling`` were never taken (or were handed back): their row
is the conductor's (a queued run_instance takes it, or the reconciler casts it again or moves
it), so recovery leaves the row alone and only removes a guest a handed-back build left behind.
Every write is a compare-and-swap on the task state recovery read, so a conductor that moved
the instance meanwhile wins; calls ride out an outage with the agent's retrier.
"""

from __future__ import annotations

import datetime

import structlog

from compute_agent.transient import Retrier, is_not_found
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import VirtError
from compute_agent.virt.models import GuestPhase, InstanceInfo
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
    for uuid, guest in guests.items():
        if uuid not in known:
            log.warning("recovery_unknown_guest", instance_uuid=uuid, phase=guest.phase.value)
    return survivors


async def _remove_leftover_guest(driver: ComputeDriver, instance: Instance) -> None:
    try:
        await driver.destroy(instance)
    except VirtError:
        log.exception("recovery_destroy_failed", instance_uuid=instance.uuid)
        return
    log.warning("recovery_leftover_guest_removed", instance_uuid=instance.uuid)
