"""Recovery at agent start: finish or fail what a crash interrupted, then trust the hypervisor.

Builds interrupted mid-way end ACTIVE when the hypervisor has the guest running, ERROR with a
fault otherwise (and any half-built guest is removed). Deletes interrupted mid-way are finished.
Guests the hypervisor has for instances the database does not place here are reported, not
touched: they may be the other half of a live migration, which the migration recovery owns.
"""

from __future__ import annotations

import datetime

import structlog

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
    ctxt: RequestContext, driver: ComputeDriver, host: str, instance: Instance, why: str
) -> None:
    try:
        await driver.destroy(instance)
    except VirtError:
        log.exception("recovery_destroy_failed", instance_uuid=instance.uuid)
    instance.vm_state = VMState.ERROR
    instance.task_state = None
    instance.power_state = PowerState.NOSTATE
    await instance.save()
    await InstanceFault(
        ctxt, instance_uuid=instance.uuid, code=500, message=why[:255], host=host
    ).create()
    log.warning("recovery_build_failed", instance_uuid=instance.uuid, reason=why)


async def _recover_build(
    ctxt: RequestContext,
    driver: ComputeDriver,
    host: str,
    instance: Instance,
    guest: InstanceInfo | None,
) -> None:
    if guest is not None and guest.phase is GuestPhase.RUNNING:
        instance.vm_state = VMState.ACTIVE
        instance.task_state = None
        instance.power_state = PowerState.RUNNING
        if instance.launched_at is None:
            instance.launched_at = datetime.datetime.now(datetime.UTC)
        await instance.save()
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
    )


async def _recover_delete(ctxt: RequestContext, driver: ComputeDriver, instance: Instance) -> None:
    await driver.destroy(instance)
    instance.vm_state = VMState.DELETED
    instance.task_state = None
    await instance.save()
    await instance.destroy()
    log.info("recovery_delete_completed", instance_uuid=instance.uuid)


async def recover_instances(
    ctxt: RequestContext, host: str, driver: ComputeDriver
) -> list[Instance]:
    """Reconcile the instances placed on ``host``; returns them as they are afterwards."""
    instances = await InstanceList.get_by_host(ctxt, host)
    guests = {g.uuid: g for g in await driver.list_guests()}
    survivors: list[Instance] = []
    for instance in instances:
        guest = guests.get(instance.uuid)
        if instance.task_state == TaskState.SCHEDULING and guest is None:
            # Assigned here but not taken yet: its run_instance is still queued for this agent
            # (or it was handed back for a reschedule). Nothing of it is here to recover.
            log.info("recovery_build_not_taken_yet", instance_uuid=instance.uuid)
            continue
        try:
            if instance.vm_state == VMState.BUILDING or instance.task_state in BUILD_TASKS:
                await _recover_build(ctxt, driver, host, instance, guest)
            elif instance.task_state == TaskState.DELETING:
                await _recover_delete(ctxt, driver, instance)
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
