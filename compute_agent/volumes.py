"""Volume attach and detach on the agent (detach_volume is one of the Juno work items)."""

from __future__ import annotations

import structlog

from compute_agent.instance_events import instance_event
from compute_agent.virt.driver import ComputeDriver
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.block_device_mapping import BlockDeviceMapping
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction

log = structlog.get_logger(__name__)


class VolumeManager:
    def __init__(self, host: str, driver: ComputeDriver, notifier: InstanceNotifier) -> None:
        self.host = host
        self.driver = driver
        self.notifier = notifier

    async def attach_volume(
        self, ctxt: RequestContext, instance: Instance, bdm: BlockDeviceMapping
    ) -> None:
        volume_id = bdm.volume_id or ""
        mountpoint = bdm.device_name or "/dev/vdb"
        extra = {"volume_id": volume_id}
        await self.notifier.emit(ctxt, instance, "instance.volume_attach.start", extra=extra)
        async with instance_event(ctxt, instance.uuid, "compute_attach_volume", self.host):
            await self.driver.attach_volume(instance, volume_id, mountpoint)
        await InstanceAction.action_finish(ctxt, instance.uuid)
        await self.notifier.emit(ctxt, instance, "instance.volume_attach.end", extra=extra)

    async def detach_volume(self, ctxt: RequestContext, instance: Instance, volume_id: str) -> None:
        """Disconnect in the hypervisor, then forget the mapping; notifications around both."""
        extra = {"volume_id": volume_id}
        # Re-read before touching the hypervisor: the instance must still be here and idle
        # (the compare-and-swap on no task fails if a migration or delete has started).
        current = await Instance.get_by_uuid(ctxt, instance.uuid)
        if current.host != self.host:
            raise exception.InvalidRequest(
                reason=f"instance {instance.uuid} is on {current.host}, not {self.host}"
            )
        await current.save(expected_task_state=[None])
        await self.notifier.emit(ctxt, instance, "instance.volume_detach.start", extra=extra)
        async with instance_event(ctxt, instance.uuid, "compute_detach_volume", self.host):
            bdm = await BlockDeviceMapping.get_by_volume_and_instance(
                ctxt, volume_id, instance.uuid
            )
            await self.driver.detach_volume(instance, volume_id)
            await bdm.destroy()
        await InstanceAction.action_finish(ctxt, instance.uuid)
        await self.notifier.emit(ctxt, instance, "instance.volume_detach.end", extra=extra)
        log.info("volume_detached", instance_uuid=instance.uuid, volume_id=volume_id)
