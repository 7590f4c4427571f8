"""Conductor side of deleting instances and of volume attach/detach requests."""

from __future__ import annotations

from typing import Any

import structlog

from conductor.db.session import Database
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import BDMDestinationType, BDMSourceType, TaskState, VMState
from shared_objects.objects.block_device_mapping import (
    BlockDeviceMapping,
    BlockDeviceMappingList,
)
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.rpc_clients.compute import ComputeAPI

log = structlog.get_logger(__name__)


class InstanceTasks:
    def __init__(self, database: Database, compute: ComputeAPI) -> None:
        self.database = database
        self.compute = compute

    async def delete_instance(self, ctxt: RequestContext, *, instance_uuid: str) -> None:
        """Builds no agent has taken yet are deleted here; placed ones by their agent."""
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            if instance.task_state == TaskState.DELETING:
                raise exception.InvalidRequest(reason=f"instance {instance_uuid} is being deleted")
            if instance.locked:
                raise exception.InvalidRequest(
                    reason=f"instance {instance_uuid} is locked: {instance.locked_reason or '-'}"
                )
            await InstanceAction.action_start(ctxt, instance_uuid, "delete")
            previous = instance.task_state
            if instance.host is None or previous == TaskState.SCHEDULING:
                # Not taken by an agent (its build may still be queued there): the agent's
                # take is a CAS on ``scheduling`` and fails once this save has run.
                instance.vm_state = VMState.DELETED
                instance.task_state = None
                await instance.save(expected_task_state=[previous])
                await instance.destroy()
                await InstanceAction.action_finish(ctxt, instance_uuid)
                return
            instance.task_state = TaskState.DELETING
            await instance.save(expected_task_state=[previous])
        await self.compute.terminate_instance(ctxt, instance.host, instance=instance)

    async def lock_instance(self, ctxt: RequestContext, *, instance_uuid: str, reason: str) -> None:
        """Protect an instance from delete and live migration until it is unlocked."""
        if not isinstance(reason, str) or not reason.strip():
            raise exception.InvalidRequest(reason="a lock needs a reason")
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            instance.locked = True
            instance.locked_reason = reason[:255]
            await instance.save()

    async def unlock_instance(self, ctxt: RequestContext, *, instance_uuid: str) -> None:
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            instance.locked = False
            instance.locked_reason = None
            await instance.save()

    async def _placed(self, ctxt: RequestContext, instance_uuid: str) -> Instance:
        instance = await Instance.get_by_uuid(ctxt, instance_uuid)
        if instance.host is None or instance.vm_state != VMState.ACTIVE:
            raise exception.InvalidRequest(
                reason=f"instance {instance_uuid} is not active on a host "
                f"(vm_state={instance.vm_state}, host={instance.host})"
            )
        if instance.task_state is not None:
            raise exception.InvalidRequest(
                reason=f"instance {instance_uuid} is busy (task_state={instance.task_state})"
            )
        return instance

    async def attach_volume(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        volume_id: str,
        device_name: str | None = None,
    ) -> dict[str, Any]:
        if not isinstance(volume_id, str) or not volume_id:
            raise exception.InvalidRequest(reason="a volume id is required")
        async with self.database.request(ctxt):
            instance = await self._placed(ctxt, instance_uuid)
            for bdm in await BlockDeviceMappingList.get_by_instance_uuid(ctxt, instance_uuid):
                if bdm.volume_id == volume_id:
                    raise exception.InvalidRequest(
                        reason=f"volume {volume_id} is already attached to {instance_uuid}"
                    )
            await InstanceAction.action_start(ctxt, instance_uuid, "attach_volume")
            bdm = BlockDeviceMapping(
                ctxt,
                instance_uuid=instance_uuid,
                source_type=BDMSourceType.VOLUME,
                destination_type=BDMDestinationType.VOLUME,
                volume_id=volume_id,
                device_name=device_name,
                boot_index=None,
                delete_on_termination=False,
            )
            await bdm.create()
        try:
            await self.compute.attach_volume(ctxt, instance.host or "", instance=instance, bdm=bdm)
        except Exception:
            async with self.database.request(ctxt):
                await bdm.destroy()
            raise
        return {"instance_uuid": instance_uuid, "volume_id": volume_id, "device": device_name}

    async def detach_volume(
        self, ctxt: RequestContext, *, instance_uuid: str, volume_id: str
    ) -> None:
        async with self.database.request(ctxt):
            instance = await self._placed(ctxt, instance_uuid)
            await BlockDeviceMapping.get_by_volume_and_instance(ctxt, volume_id, instance_uuid)
            await InstanceAction.action_start(ctxt, instance_uuid, "detach_volume")
        await self.compute.detach_volume(
            ctxt, instance.host or "", instance=instance, volume_id=volume_id
        )
