"""The conductor's live-migration task: validate, lock the instance, pick a destination, hand
off to the source agent, and learn the outcome.

``live_migrate_instance`` checks the request before writing anything (unknown instance, not
ACTIVE, busy, source agent down, destination unknown/down/same host/too small: a clear error,
nothing changed), then in one unit of work takes the instance with a CAS to ``migrating``
(expected ``None``: a second migration of a migrating instance is refused), creates the
Migration (``live-migration``, ``accepted``) and the InstanceAction ``live-migration``, and
returns the Migration's uuid. The rest runs in a task of this conductor:

1. prechecks on a destination (``check_can_live_migrate_destination``, which asks the source);
   a host that refuses is excluded and the scheduler picks another, up to ``max_attempts``;
2. Migration ``queued``, then a long call of ``live_migration`` to the source with call-monitor
   heartbeats. The source drives the rest and writes every status; the call returns the
   outcome when the migration ends.
3. If the source stops answering (no heartbeat for ``call_monitor_timeout`` seconds) the
   Migration is marked ``error`` at once (only if still unfinished: a compare-and-swap) with a
   fault naming the host; the instance stays ``migrating`` until that agent's recovery settles
   it from both hypervisors (possibly as ``completed`` if the switch-over had happened).
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import structlog

from conductor.db.session import Database
from conductor.host_view import HostView, HostViewSettings
from conductor.scheduler import ResourceRequest, select_destinations
from conductor.tasks.live_migration.checks import check_hosts, check_instance, invalid
from conductor.tasks.live_migration.settings import LiveMigrationTaskSettings
from conductor.tasks.live_migration.views import read_migration, read_migrations
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.exception import NoValidHost
from shared_objects.fields import MigrationStatus, MigrationType, TaskState, VMState
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.migration import Migration
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.runtime.messaging import MessageUndeliverable, MessagingTimeout

log = structlog.get_logger(__name__)

UNFINISHED = [s for s in MigrationStatus.ALL if s not in MigrationStatus.FINISHED]


class LiveMigrationTask:
    """Conductor side of live migration."""

    def __init__(
        self,
        database: Database,
        compute: ComputeAPI,
        settings: LiveMigrationTaskSettings | None = None,
        host_view: HostView | None = None,
    ) -> None:
        self.database = database
        self.compute = compute
        self.settings = settings or LiveMigrationTaskSettings()
        # The conductor's cached host view (shared with builds when the endpoint passes it).
        self.host_view = host_view or HostView(
            HostViewSettings(service_down_time=self.settings.service_down_time)
        )
        self._running: dict[str, asyncio.Task[None]] = {}
        self._bandwidth_limits: dict[str, int] = {}

    # --- the request ----------------------------------------------------------------------

    async def live_migrate_instance(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        host: str | None = None,
        bandwidth_limit_mb_s: int | None = None,
    ) -> str:
        """Start migrating the instance (to ``host`` or a scheduled one); the Migration uuid.

        ``bandwidth_limit_mb_s`` caps the memory copy (LiveMigrateData 1.1; a source of an
        older release does not know it and copies at full speed).
        """
        if not isinstance(instance_uuid, str) or not instance_uuid:
            raise invalid("an instance uuid is required")
        if bandwidth_limit_mb_s is not None and (
            isinstance(bandwidth_limit_mb_s, bool)
            or not isinstance(bandwidth_limit_mb_s, int)
            or bandwidth_limit_mb_s < 1
        ):
            raise invalid("bandwidth limit must be a positive whole number of MB/s")
        if host is not None and (not isinstance(host, str) or not host):
            raise invalid("the destination host must be a host name")
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            source = check_instance(instance)
            hosts = (await self.host_view.fleet(ctxt)).states
            check_hosts(instance, source, host, hosts)
            instance.task_state = TaskState.MIGRATING
            instance.progress = 0  # this migration's progress, not the last one's
            try:
                await instance.save(expected_task_state=[None], expected_vm_state=[VMState.ACTIVE])
            except (exception.UnexpectedTaskStateError, exception.UnexpectedVMStateError) as exc:
                raise invalid(f"instance {instance_uuid} changed meanwhile: {exc}") from exc
            migration = Migration(
                ctxt,
                instance_uuid=instance_uuid,
                source_compute=source,
                source_node=instance.node,
                dest_compute=host,
                dest_node=None,
                status=MigrationStatus.ACCEPTED,
                migration_type=MigrationType.LIVE_MIGRATION,
            )
            await migration.create()
            await InstanceAction.action_start(ctxt, instance_uuid, "live-migration")
        log.info(
            "live_migration_accepted",
            instance_uuid=instance_uuid,
            migration_uuid=migration.uuid,
            source=source,
            dest=host,
        )
        if bandwidth_limit_mb_s is not None:
            self._bandwidth_limits[migration.uuid] = bandwidth_limit_mb_s
        task = asyncio.create_task(
            self._run(ctxt, instance, migration, host), name=f"live-migration-task-{migration.uuid}"
        )
        self._running[migration.uuid] = task
        task.add_done_callback(lambda _t: self._running.pop(migration.uuid, None))
        return migration.uuid

    # --- the task -------------------------------------------------------------------------

    async def _run(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, forced: str | None
    ) -> None:
        bound = log.bind(instance_uuid=instance.uuid, migration_uuid=migration.uuid)
        handed_over = False
        try:
            picked = await self._precheck(ctxt, instance, migration, forced)
            if picked is None:
                return
            _dest, migrate_data = picked
            limit = self._bandwidth_limits.pop(migration.uuid, None)
            if limit is not None:
                migrate_data = {**migrate_data, "bandwidth_limit_mb_s": limit}
            handed_over = True
            source = migration.source_compute or ""
            try:
                outcome = await self.compute.live_migration(
                    ctxt,
                    source,
                    instance=instance,
                    migration=migration,
                    migrate_data=migrate_data,
                    call_monitor_timeout=self.settings.call_monitor_timeout,
                    timeout=self.settings.migration_timeout,
                )
            except MessageUndeliverable as exc:
                # No queue took the call (the source's went with a broker restart and is not
                # back yet): nothing reached the source, so the instance is released here.
                bound.warning("live_migration_undeliverable", error=str(exc))
                await self._fail(
                    ctxt,
                    instance,
                    migration,
                    MigrationStatus.ERROR,
                    str(exc),
                    from_status=migration.status,
                )
                return
            except MessagingTimeout as exc:
                await self._source_lost(ctxt, instance, migration, f"stopped answering: {exc}")
                return
            bound.info("live_migration_outcome", **outcome)
        except Exception as exc:
            bound.exception("live_migration_task_failed", handed_over=handed_over)
            why = f"{type(exc).__name__}: {exc}"
            if handed_over:
                # The conductor could not follow the migration (e.g. the source's handler
                # failed): record it; the agents' settle logic owns the instance.
                await self._source_lost(ctxt, instance, migration, why)
            else:
                # Nothing reached the source: release the instance here.
                await self._fail(ctxt, instance, migration, MigrationStatus.ERROR, why)

    async def _precheck(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, forced: str | None
    ) -> tuple[str, dict[str, Any]] | None:
        """Find a destination that passes the prechecks and mark the migration ``queued``."""
        source = migration.source_compute or ""
        tried = [source]
        reasons: list[str] = []
        req = ResourceRequest(instance.vcpus, instance.memory_mb, instance.root_gb)
        for _attempt in range(self.settings.max_attempts if forced is None else 1):
            if await self._status(ctxt, migration.uuid) != MigrationStatus.ACCEPTED:
                await self._stopped(ctxt, instance, migration)
                return None
            dest = forced
            node: str | None = None
            if dest is None:
                async with self.database.request(ctxt):
                    hosts = (await self.host_view.fleet(ctxt)).states
                try:
                    pick = select_destinations(hosts, req, 1, alternates=0, ignore_hosts=tried)
                except NoValidHost as exc:
                    reasons.append(str(exc))
                    break
                dest, node = pick[0][0].host, pick[0][0].node
            # Name the candidate in the row before asking it (a CAS from ``accepted``): the
            # source answers its precheck call only for the destination the row names.
            if not await self._propose(ctxt, migration, dest):
                await self._stopped(ctxt, instance, migration)
                return None
            try:
                data = await self.compute.check_can_live_migrate_destination(
                    ctxt,
                    dest,
                    instance=instance,
                    migration=migration,
                    source_host=source,
                    call_monitor_timeout=self.settings.call_monitor_timeout,
                    timeout=self.settings.precheck_timeout,
                )
            except Exception as exc:
                # Any refusal or silence: this host is out, the scheduler may pick another.
                log.info("live_migration_precheck_failed", dest=dest, error=str(exc))
                reasons.append(f"{dest}: {type(exc).__name__}: {exc}")
                tried.append(dest)
                continue
            dest_node = str(data.get("dest_node") or node or dest)
            # A source that restarted meanwhile may have settled it: CAS from ``accepted``.
            queued = {
                "status": MigrationStatus.QUEUED,
                "dest_compute": dest,
                "dest_node": dest_node,
            }
            if not await self._while_accepted(ctxt, migration, queued):
                await self._stopped(ctxt, instance, migration)
                return None
            return dest, data
        await self._fail(
            ctxt,
            instance,
            migration,
            MigrationStatus.FAILED,
            "no destination passed the live-migration prechecks: " + "; ".join(reasons),
        )
        return None

    async def _propose(self, ctxt: RequestContext, migration: Migration, dest: str) -> bool:
        """Record ``dest`` as the candidate destination while the migration is ``accepted``;
        False when it has left ``accepted`` (aborted, or settled by its source)."""
        return await self._while_accepted(ctxt, migration, {"dest_compute": dest})

    async def _while_accepted(
        self, ctxt: RequestContext, migration: Migration, values: dict[str, Any]
    ) -> bool:
        """Write ``values`` to the migration in one compare-and-swap on ``accepted`` (and into
        ``migration``); False when it has left ``accepted``."""
        async with self.database.request(ctxt):
            db = ctxt.db
            assert db is not None
            rows = await db.update(
                "migrations",
                {"uuid": migration.uuid, "status": MigrationStatus.ACCEPTED},
                {**values, "updated_at": datetime.datetime.now(datetime.UTC)},
                returning=["status"],
            )
        if rows:
            for name, value in values.items():
                setattr(migration, name, value)
            migration.obj_reset_changes(list(values))
        return bool(rows)

    async def _status(self, ctxt: RequestContext, migration_uuid: str) -> str:
        async with self.database.request(ctxt):
            return (await Migration.get_by_uuid(ctxt, migration_uuid)).status

    async def _stopped(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> None:
        """The migration left ``accepted`` under this task: aborted, or settled by its source."""
        status = await self._status(ctxt, migration.uuid)
        if status == MigrationStatus.CANCELLED:
            async with self.database.request(ctxt):
                await self._finish_action(ctxt, instance.uuid, "Cancelled")
        log.info("live_migration_stopped_during_prechecks", migration=migration.uuid, status=status)

    @staticmethod
    async def _release(ctxt: RequestContext, instance_uuid: str) -> None:
        """``migrating`` → None (CAS), progress back to 0: nothing moved."""
        current = await Instance.get_by_uuid(ctxt, instance_uuid)
        current.task_state = None
        current.progress = 0
        try:
            await current.save(expected_task_state=[TaskState.MIGRATING])
        except exception.UnexpectedTaskStateError:
            log.warning("live_migration_instance_moved_on", instance_uuid=instance_uuid)

    @staticmethod
    async def _leave_accepted(
        ctxt: RequestContext,
        migration_uuid: str,
        status: str,
        from_status: str = MigrationStatus.ACCEPTED,
    ) -> bool:
        """CAS ``from_status`` (``accepted``) → ``status``; False when someone moved it first."""
        db = ctxt.db
        assert db is not None
        rows = await db.update(
            "migrations",
            {"uuid": migration_uuid, "status": from_status},
            {"status": status, "updated_at": datetime.datetime.now(datetime.UTC)},
            returning=["status"],
        )
        return bool(rows)

    async def _fail(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        status: str,
        reason: str,
        from_status: str = MigrationStatus.ACCEPTED,
    ) -> None:
        """Before the source got involved: release the instance (CAS) and record why."""
        async with self.database.request(ctxt):
            if not await self._leave_accepted(ctxt, migration.uuid, status, from_status):
                log.info("live_migration_already_moved_on", migration=migration.uuid)
                return
            migration.status = status
            migration.obj_reset_changes(["status"])
            await self._release(ctxt, instance.uuid)
            if status != MigrationStatus.CANCELLED:
                await InstanceFault(
                    ctxt,
                    instance_uuid=instance.uuid,
                    code=400,
                    message=f"Live migration {status}: {reason}"[:255],
                    details=reason,
                ).create()
            await self._finish_action(ctxt, instance.uuid, "Error")
        log.warning("live_migration_not_started", instance_uuid=instance.uuid, reason=reason)

    async def _source_lost(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, detail: str
    ) -> None:
        """The source stopped answering: mark the migration ``error`` if it is unfinished."""
        source = migration.source_compute
        async with self.database.request(ctxt):
            db = ctxt.db
            assert db is not None
            # A CAS in one statement: a status the source wrote meanwhile wins.
            rows = await db.update(
                "migrations",
                {"uuid": migration.uuid, "status": UNFINISHED},
                {
                    "status": MigrationStatus.ERROR,
                    "updated_at": datetime.datetime.now(datetime.UTC),
                },
                returning=["status"],
            )
            if rows:
                await InstanceFault(
                    ctxt,
                    instance_uuid=instance.uuid,
                    code=500,
                    message=(
                        f"Live migration: source agent {source} lost ({detail}); its recovery "
                        "settles the instance"
                    )[:255],
                    details=detail,
                    host=source,
                ).create()
                await self._finish_action(ctxt, instance.uuid, "Error")
        log.error(
            "live_migration_source_lost",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
            source=source,
            detail=detail,
            marked_error=bool(rows),
        )

    @staticmethod
    async def _finish_action(ctxt: RequestContext, instance_uuid: str, message: str) -> None:
        try:
            await InstanceAction.action_finish(ctxt, instance_uuid, message=message)
        except exception.InstanceActionNotFound:
            log.debug("no_live_migration_action", instance_uuid=instance_uuid)

    # --- operator actions -----------------------------------------------------------------

    async def _unfinished(self, ctxt: RequestContext, migration_uuid: str) -> Migration:
        async with self.database.request(ctxt):
            migration = await Migration.get_by_uuid(ctxt, migration_uuid)
        if migration.migration_type != MigrationType.LIVE_MIGRATION:
            raise invalid(f"migration {migration_uuid} is not a live migration")
        if migration.is_finished:
            raise invalid(f"migration {migration_uuid} is already {migration.status}")
        return migration

    async def live_migration_abort(
        self, ctxt: RequestContext, *, migration_uuid: str, reason: str | None = None
    ) -> None:
        """Stop a live migration: the instance stays on its source (``cancelled``)."""
        migration = await self._unfinished(ctxt, migration_uuid)
        if migration.status == MigrationStatus.ACCEPTED:
            # Still in prechecks (on whichever replica): cancel in the database; the task sees
            # it at its next step and stops before handing anything over.
            async with self.database.request(ctxt):
                if await self._leave_accepted(ctxt, migration_uuid, MigrationStatus.CANCELLED):
                    await self._release(ctxt, migration.instance_uuid)
                    log.info("live_migration_cancelled_in_prechecks", migration=migration_uuid)
                    return
            migration = await self._unfinished(ctxt, migration_uuid)
        await self.compute.live_migration_abort(
            ctxt,
            migration.source_compute or "",
            migration_uuid=migration_uuid,
            reason=reason,
            timeout=self.settings.rpc_timeout,
        )

    async def live_migration_force_complete(
        self, ctxt: RequestContext, *, migration_uuid: str
    ) -> None:
        """Pause the guest so its memory copy converges (only while ``running``)."""
        migration = await self._unfinished(ctxt, migration_uuid)
        if migration.status != MigrationStatus.RUNNING:
            raise invalid(
                f"migration {migration_uuid} is {migration.status}; force-complete needs running"
            )
        await self.compute.live_migration_force_complete(
            ctxt,
            migration.source_compute or "",
            migration_uuid=migration_uuid,
            timeout=self.settings.rpc_timeout,
        )

    async def get_migration(self, ctxt: RequestContext, *, migration_uuid: str) -> dict[str, Any]:
        """The Migration (status, progress bytes) plus the instance's progress percentage."""
        return await read_migration(self.database, ctxt, migration_uuid)

    async def list_migrations(
        self, ctxt: RequestContext, *, instance_uuid: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Migrations, newest first (of one instance when given)."""
        return await read_migrations(self.database, ctxt, instance_uuid, limit)

    async def wait(self, migration_uuid: str) -> None:
        """Wait until this conductor's task for the migration ends (tests, tools)."""
        task = self._running.get(migration_uuid)
        if task is not None:
            await asyncio.shield(task)
