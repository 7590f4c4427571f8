"""Client of the conductor's compute-task API (namespace ``compute_task``).

Used by ``fleetctl`` (boot, delete, volumes) and by agents (handing a failed build back for a
reschedule). Any conductor replica may answer: calls go to the ``conductor`` topic. The server
(``conductor.tasks.endpoint``) takes its target from the constants here.
"""

from __future__ import annotations

from typing import Any

from shared_objects.context import RequestContext
from shared_objects.rpc_clients import conductor
from shared_objects.runtime.messaging import RPCClient, Target, Transport
from shared_objects.runtime.messaging.authorization import ReplyFrom

# The conductors' one queue serves this API beside the indirection API.
TOPIC = conductor.TOPIC
NAMESPACE = "compute_task"

# Compute-task API history:
# 1.0: Initial version: build_instances, reschedule_instance, delete_instance, attach_volume,
#      detach_volume, live_migrate_instance, live_migration_abort,
#      live_migration_force_complete, get_migration, list_migrations,
#      security_group_create, security_group_list, security_group_rule_add,
#      security_group_rule_delete.
# 1.1: lock_instance, unlock_instance; live_migrate_instance takes bandwidth_limit_mb_s,
#      live_migration_abort takes a reason.
API_VERSION = "1.1"


class ComputeTaskAPI:
    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float | None = None,
        reply_from: ReplyFrom | None = None,
    ) -> None:
        self.client = RPCClient(
            transport,
            # Each call asks for the oldest version that has what it sends, so a client keeps
            # working with conductors of the previous release during their upgrade.
            Target(topic=TOPIC, namespace=NAMESPACE, version="1.0"),
            timeout=timeout,
            reply_from=reply_from,
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

    # --- live migration (docs/live-migration.md) ------------------------------------------

    async def live_migrate_instance(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        host: str | None = None,
        bandwidth_limit_mb_s: int | None = None,
    ) -> str:
        """Start a live migration (to ``host``, or one the scheduler picks); the Migration uuid.

        Returns once the request is validated and recorded (status ``accepted``); follow it
        with ``get_migration``. Bad requests raise ``InvalidRequest`` and change nothing.
        """
        extra = (
            {} if bandwidth_limit_mb_s is None else {"bandwidth_limit_mb_s": bandwidth_limit_mb_s}
        )
        cctx = self.client.prepare(version="1.1") if extra else self.client
        result: str = await cctx.call(
            ctxt, "live_migrate_instance", instance_uuid=instance_uuid, host=host, **extra
        )
        return result

    async def live_migration_abort(
        self, ctxt: RequestContext, *, migration_uuid: str, reason: str | None = None
    ) -> None:
        extra = {} if reason is None else {"reason": reason}
        cctx = self.client.prepare(version="1.1") if extra else self.client
        await cctx.call(ctxt, "live_migration_abort", migration_uuid=migration_uuid, **extra)

    async def lock_instance(self, ctxt: RequestContext, *, instance_uuid: str, reason: str) -> None:
        await self.client.prepare(version="1.1").call(
            ctxt, "lock_instance", instance_uuid=instance_uuid, reason=reason
        )

    async def unlock_instance(self, ctxt: RequestContext, *, instance_uuid: str) -> None:
        await self.client.prepare(version="1.1").call(
            ctxt, "unlock_instance", instance_uuid=instance_uuid
        )

    async def live_migration_force_complete(
        self, ctxt: RequestContext, *, migration_uuid: str
    ) -> None:
        await self.client.call(ctxt, "live_migration_force_complete", migration_uuid=migration_uuid)

    async def get_migration(self, ctxt: RequestContext, *, migration_uuid: str) -> dict[str, Any]:
        """The Migration as a dict (uuid, instance_uuid, source/dest compute and node, status,
        migration_type, memory_total/processed/remaining, created_at, updated_at) plus the
        instance's ``progress`` percentage."""
        result: dict[str, Any] = await self.client.call(
            ctxt, "get_migration", migration_uuid=migration_uuid
        )
        return result

    async def list_migrations(
        self, ctxt: RequestContext, *, instance_uuid: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Migrations newest first, as ``get_migration`` dicts (``progress`` None)."""
        result: list[dict[str, Any]] = await self.client.call(
            ctxt, "list_migrations", instance_uuid=instance_uuid, limit=limit
        )
        return result

    async def security_group_create(
        self, ctxt: RequestContext, *, name: str, description: str = ""
    ) -> int:
        group_id: int = await self.client.call(
            ctxt, "security_group_create", name=name, description=description
        )
        return group_id

    async def security_group_list(self, ctxt: RequestContext) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = await self.client.call(ctxt, "security_group_list")
        return groups

    async def security_group_rule_add(
        self,
        ctxt: RequestContext,
        *,
        group: str,
        protocol: str,
        from_port: int,
        to_port: int,
        cidr: str = "0.0.0.0/0",
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.call(
            ctxt,
            "security_group_rule_add",
            group=group,
            protocol=protocol,
            from_port=from_port,
            to_port=to_port,
            cidr=cidr,
        )
        return result

    async def security_group_rule_delete(
        self, ctxt: RequestContext, *, rule_id: int
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.call(
            ctxt, "security_group_rule_delete", rule_id=rule_id
        )
        return result
