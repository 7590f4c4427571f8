"""Client of the conductor's compute-task API (namespace ``compute_task``).

Used by ``fleetctl`` (boot, delete, volumes) and by agents (handing a failed build back for a
reschedule). Any conductor replica may answer: calls go to the ``conductor`` topic.
"""

from __future__ import annotations

from typing import Any

from shared_objects.context import RequestContext
from shared_objects.messaging import RPCClient, Target, Transport

TOPIC = "conductor"
NAMESPACE = "compute_task"

# Compute-task API history:
# 1.0: Initial version: build_instances, reschedule_instance, delete_instance, attach_volume,
#      detach_volume.
API_VERSION = "1.0"


class ComputeTaskAPI:
    def __init__(self, transport: Transport, *, timeout: float | None = None) -> None:
        self.client = RPCClient(
            transport,
            Target(topic=TOPIC, namespace=NAMESPACE, version=API_VERSION),
            timeout=timeout,
        )

    async def build_instances(self, ctxt: RequestContext, **request: Any) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.client.call(ctxt, "build_instances", **request)
        return result

    async def reschedule_instance(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        failed_host: str,
        reason: str,
        request_spec: dict[str, Any],
    ) -> None:
        await self.client.call(
            ctxt,
            "reschedule_instance",
            instance_uuid=instance_uuid,
            failed_host=failed_host,
            reason=reason,
            request_spec=request_spec,
        )

    async def delete_instance(self, ctxt: RequestContext, *, instance_uuid: str) -> None:
        await self.client.call(ctxt, "delete_instance", instance_uuid=instance_uuid)

    async def attach_volume(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        volume_id: str,
        device_name: str | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.call(
            ctxt,
            "attach_volume",
            instance_uuid=instance_uuid,
            volume_id=volume_id,
            device_name=device_name,
        )
        return result

    async def detach_volume(
        self, ctxt: RequestContext, *, instance_uuid: str, volume_id: str
    ) -> None:
        await self.client.call(
            ctxt, "detach_volume", instance_uuid=instance_uuid, volume_id=volume_id
        )
