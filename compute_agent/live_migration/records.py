"""What a migration leaves behind on the agent: status, fault and action records, and the
migration fields of its notifications.

Every write goes through the agent's ``Retrier`` (``compute_agent/transient.py``), so a
database or broker outage is ridden out call by call.
"""

from __future__ import annotations

from typing import Any

import structlog

from compute_agent.transient import TRANSIENT_ERRORS, Retrier, short
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.migration import Migration

log = structlog.get_logger(__name__)


def notification_extra(migration: Migration) -> dict[str, Any]:
    """Migration fields added to ``instance.live_migration_*`` notification payloads."""
    return {
        "migration_uuid": migration.uuid,
        "source_compute": migration.source_compute,
        "dest_compute": migration.dest_compute,
    }


class MigrationRecords:
    """Writes of one host's live-migration flows (source and destination)."""

    def __init__(self, host: str, calls: Retrier) -> None:
        self.host = host
        self.calls = calls

    async def set_status(self, migration: Migration, status: str) -> None:
        # Writes the same value again on a retry: idempotent as it stands.
        migration.status = status
        await self.calls.call(f"migration {status}", migration.save, migration_uuid=migration.uuid)

    async def fault(self, ctxt: RequestContext, instance_uuid: str, message: str) -> None:
        fault = InstanceFault(
            ctxt, instance_uuid=instance_uuid, code=500, message=message[:255], host=self.host
        )
        await self.calls.call("record fault", fault.create, instance_uuid=instance_uuid)

    async def finish_action(
        self, ctxt: RequestContext, instance_uuid: str, message: str | None
    ) -> None:
        try:
            await self.calls.call(
                "finish action",
                lambda: InstanceAction.action_finish(ctxt, instance_uuid, message=message),
                instance_uuid=instance_uuid,
            )
        except exception.InstanceActionNotFound:
            log.debug("no_live_migration_action", instance_uuid=instance_uuid)
        except TRANSIENT_ERRORS as exc:
            log.warning("action_finish_not_recorded", instance_uuid=instance_uuid, error=short(exc))
