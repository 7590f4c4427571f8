"""The conductor's compute-task RPC endpoint (namespace ``compute_task``).

Thin on purpose: it checks argument shapes and hands each call to the task that owns it. Each
call runs inside ``_served``: a database outage reaches the caller as ``DatabaseUnavailable``
(``conductor/db/errors.py``), one class it can retry, instead of a driver error.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from conductor.db.errors import database_unavailable_boundary
from conductor.db.session import Database
from conductor.host_view import HostView
from conductor.tasks.build import BuildTask
from conductor.tasks.build_placement import BuildSettings
from conductor.tasks.instances import InstanceTasks
from conductor.tasks.live_migration import LiveMigrationTask, LiveMigrationTaskSettings
from conductor.tasks.security_groups import SecurityGroupTasks
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.rpc_clients.compute_task import API_VERSION, NAMESPACE
from shared_objects.runtime import audit
from shared_objects.runtime.authorizer import forbidden
from shared_objects.runtime.identity import Caller
from shared_objects.runtime.messaging import ExpectedException, Target, expose

_T = TypeVar("_T")


async def _served(ctxt: RequestContext, method: str, work: Awaitable[_T]) -> _T:
    """Await one call's work; a database outage becomes ``DatabaseUnavailable`` (one WARNING
    line from the boundary, no traceback). Fleet's own errors (an invalid request, a missing
    instance, an outage) are the caller's answer, not a fault of this server: they go back as
    expected errors, without an ERROR traceback in the conductor's log."""
    try:
        async with database_unavailable_boundary(f"compute_task.{method}", ctxt.caller):
            return await work
    except exception.FleetException as exc:
        raise ExpectedException(exc) from exc


class ComputeTaskEndpoint:
    target = Target(namespace=NAMESPACE, version=API_VERSION)

    def __init__(
        self,
        database: Database,
        compute: ComputeAPI,
        settings: BuildSettings | None = None,
        live_migration_settings: LiveMigrationTaskSettings | None = None,
        host_view: HostView | None = None,
    ) -> None:
        # Each task owns one flow; this endpoint only routes calls to them.
        self.build = BuildTask(database, compute, settings, host_view)
        self.instances = InstanceTasks(database, compute)
        self.security_groups = SecurityGroupTasks(database, compute)
        self.live_migration = LiveMigrationTask(
            database,
            compute,
            live_migration_settings
            or LiveMigrationTaskSettings(service_down_time=self.build.settings.service_down_time),
            host_view=self.build.host_view,
        )

    @expose
    async def build_instances(
        self,
        ctxt: RequestContext,
        flavor: str,
        name: str,
        image_ref: str = "fake-image",
        count: int = 1,
        security_groups: list[str] | None = None,
        block_device_mappings: list[dict[str, Any]] | None = None,
        forced_host: str | None = None,
    ) -> list[dict[str, Any]]:
        return await _served(
            ctxt,
            "build_instances",
            self.build.build_instances(
                ctxt,
                flavor=flavor,
                name=name,
                image_ref=image_ref,
                count=count,
                security_groups=security_groups,
                block_device_mappings=block_device_mappings,
                forced_host=forced_host,
            ),
        )

    @expose
    async def reschedule_instance(
        self,
        ctxt: RequestContext,
        instance_uuid: str,
        failed_host: str,
        reason: str,
        request_spec: dict[str, Any],
    ) -> None:
        # An agent may only hand back its own failed build (the task checks the instance is
        # still assigned to it); older agents on the legacy shared login clear the host first.
        caller = ctxt.principal
        unassigned_ok = True
        if isinstance(caller, Caller) and caller.is_agent:
            if not caller.speaks_for(failed_host):
                action = "compute_task.reschedule_instance"
                audit.refused(caller, action, instance_uuid, f"failed_host {failed_host!r}")
                raise ExpectedException(forbidden(caller, action, instance_uuid))
            unassigned_ok = caller.legacy
        await _served(
            ctxt,
            "reschedule_instance",
            self.build.reschedule_instance(
                ctxt,
                instance_uuid=instance_uuid,
                failed_host=failed_host,
                reason=reason,
                request_spec=request_spec,
                allow_unassigned=unassigned_ok,
            ),
        )

    @expose
    async def delete_instance(self, ctxt: RequestContext, instance_uuid: str) -> None:
        await _served(
            ctxt,
            "delete_instance",
            self.instances.delete_instance(ctxt, instance_uuid=instance_uuid),
        )

    @expose
    async def attach_volume(
        self,
        ctxt: RequestContext,
        instance_uuid: str,
        volume_id: str,
        device_name: str | None = None,
    ) -> dict[str, Any]:
        return await _served(
            ctxt,
            "attach_volume",
            self.instances.attach_volume(
                ctxt, instance_uuid=instance_uuid, volume_id=volume_id, device_name=device_name
            ),
        )

    @expose
    async def detach_volume(self, ctxt: RequestContext, instance_uuid: str, volume_id: str) -> None:
        await _served(
            ctxt,
            "detach_volume",
            self.instances.detach_volume(ctxt, instance_uuid=instance_uuid, volume_id=volume_id),
        )

    # --- live migration (conductor/tasks/live_migration/) ----------------------------------

    @expose
    async def live_migrate_instance(
        self,
        ctxt: RequestContext,
        instance_uuid: str,
        host: str | None = None,
        bandwidth_limit_mb_s: int | None = None,
    ) -> str:
        return await _served(
            ctxt,
            "live_migrate_instance",
            self.live_migration.live_migrate_instance(
                ctxt,
                instance_uuid=instance_uuid,
                host=host,
                bandwidth_limit_mb_s=bandwidth_limit_mb_s,
            ),
        )

    @expose
    async def live_migration_abort(
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        await _served(
            ctxt,
            "live_migration_abort",
            self.live_migration.live_migration_abort(
                ctxt, migration_uuid=migration_uuid, reason=reason
            ),
        )

    @expose
    async def lock_instance(self, ctxt: RequestContext, instance_uuid: str, reason: str) -> None:
        await _served(
            ctxt,
            "lock_instance",
            self.instances.lock_instance(ctxt, instance_uuid=instance_uuid, reason=reason),
        )

    @expose
    async def unlock_instance(self, ctxt: RequestContext, instance_uuid: str) -> None:
        await _served(
            ctxt,
            "unlock_instance",
            self.instances.unlock_instance(ctxt, instance_uuid=instance_uuid),
        )

    @expose
    async def live_migration_force_complete(
        self, ctxt: RequestContext, migration_uuid: str
    ) -> None:
        await _served(
            ctxt,
            "live_migration_force_complete",
            self.live_migration.live_migration_force_complete(ctxt, migration_uuid=migration_uuid),
        )

    @expose
    async def get_migration(self, ctxt: RequestContext, migration_uuid: str) -> dict[str, Any]:
        return await _served(
            ctxt,
            "get_migration",
            self.live_migration.get_migration(ctxt, migration_uuid=migration_uuid),
        )

    @expose
    async def list_migrations(
        self, ctxt: RequestContext, instance_uuid: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        return await _served(
            ctxt,
            "list_migrations",
            self.live_migration.list_migrations(ctxt, instance_uuid=instance_uuid, limit=limit),
        )

    @expose
    async def security_group_create(
        self, ctxt: RequestContext, name: str, description: str = ""
    ) -> int:
        return await _served(
            ctxt,
            "security_group_create",
            self.security_groups.create(ctxt, name=name, description=description),
        )

    @expose
    async def security_group_list(self, ctxt: RequestContext) -> list[dict[str, Any]]:
        return await _served(ctxt, "security_group_list", self.security_groups.list(ctxt))

    @expose
    async def security_group_rule_add(
        self,
        ctxt: RequestContext,
        group: str,
        protocol: str,
        from_port: int,
        to_port: int,
        cidr: str = "0.0.0.0/0",
    ) -> dict[str, Any]:
        return await _served(
            ctxt,
            "security_group_rule_add",
            self.security_groups.add_rule(
                ctxt,
                group=group,
                protocol=protocol,
                from_port=from_port,
                to_port=to_port,
                cidr=cidr,
            ),
        )

    @expose
    async def security_group_rule_delete(
        self, ctxt: RequestContext, rule_id: int
    ) -> dict[str, Any]:
        return await _served(
            ctxt,
            "security_group_rule_delete",
            self.security_groups.delete_rule(ctxt, rule_id=rule_id),
        )
