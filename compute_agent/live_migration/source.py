"""The source half of live migration: this host drives the whole protocol.

The conductor calls ``live_migration`` on the source with call-monitor heartbeats and gets the
outcome back when the migration ends; the source drives everything else (docs/live-migration.md):

    source                                   destination
    queued ─ preparing ── pre_live_migration ──▶ claim, paused INCOMING guest
             running   ── memory copy (progress saved at a bounded rate)
             post-migrating ─ post_live_migration_at_destination ─▶ resume, instance.host = dest
             completed ◀─ remove the paused copy, release the claim

Every instance change is a compare-and-swap on ``task_state == migrating``. Failures before the
switch-over roll back (destination first, then the source keeps running the guest); a failure
whose outcome is unknown (a peer that stopped answering) never guesses: the instance is settled
by ``MigrationResolver`` (``resolver.py``) from both hypervisors' phases, now if the peer
answers, otherwise when it does (retried here, and by the peer's own recovery at its restart).

A cancelled migration task (agent stopping past its grace period) is treated like a crash:
nothing is undone, the next start's recovery settles it.

Database and broker outages: every conductor call of both halves is retried through an outage
(``compute_agent/transient.py``); progress saves are skipped instead (the next one catches
up). A source flow that still fails on an outage is settled from the hypervisors like any
unknown outcome, and when even that cannot be recorded the resolver retries it until it can.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from compute_agent.instance_events import instance_event
from compute_agent.live_migration.jobs import STARTABLE, Job, Jobs, Stage, outcome
from compute_agent.live_migration.progress import progress_saver
from compute_agent.live_migration.records import MigrationRecords, notification_extra
from compute_agent.live_migration.resolver import Settlement
from compute_agent.live_migration.wiring import Half, Wiring
from compute_agent.transient import TRANSIENT_ERRORS, short
from compute_agent.virt.exceptions import MigrationAborted, MigrationPreCheckError, VirtError
from compute_agent.virt.models import GuestPhase
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import MigrationStatus, PowerState, TaskState
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration
from shared_objects.runtime.messaging import MessagingError

log = structlog.get_logger(__name__)


class Source(Half):
    """This host as the source of live migrations: one job per Migration, run to its end."""

    def __init__(self, wiring: Wiring, jobs: Jobs, records: MigrationRecords) -> None:
        super().__init__(wiring)
        self.jobs = jobs
        self.records = records
        # Created on first use: it must belong to the running event loop.
        self._semaphore: asyncio.Semaphore | None = None

    async def check_can_live_migrate_source(
        self, ctxt: RequestContext, instance: Instance, dest_check_data: dict[str, Any]
    ) -> dict[str, Any]:
        """Can the guest leave this host? Returns the migrate data for the destination."""
        if instance.host != self.host:
            raise MigrationPreCheckError(
                uuid=instance.uuid, reason=f"instance is on {instance.host}, not {self.host}"
            )
        if len(self.jobs) >= self.settings.max_in_flight:
            raise MigrationPreCheckError(
                uuid=instance.uuid,
                reason=f"{self.host} already runs {len(self.jobs)} outgoing live migrations",
            )
        async with instance_event(
            ctxt, instance.uuid, "compute_check_can_live_migrate_source", self.host
        ):
            return await self.driver.check_can_live_migrate_source(instance, dest_check_data)

    async def live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the migration (once per Migration, even if the call is redelivered) to its end."""
        job = self.jobs.get(migration.uuid)
        if job is None:
            job = Job(instance.uuid)
            job.task = asyncio.create_task(
                self._run_source(ctxt, job, instance, migration, migrate_data),
                name=f"live-migration-{migration.uuid}",
            )
            self.jobs.add(migration.uuid, job)
        assert job.task is not None
        # The handler may be cancelled (server stopping); the migration itself goes on.
        return await asyncio.shield(job.task)

    async def _run_source(
        self,
        ctxt: RequestContext,
        job: Job,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        bound = log.bind(instance_uuid=instance.uuid, migration_uuid=migration.uuid)
        try:
            return await self._migrate(ctxt, job, instance, migration, migrate_data)
        except asyncio.CancelledError:
            bound.warning("live_migration_cancelled_left_for_recovery", stage=job.stage.value)
            raise
        except Exception as exc:
            # A bug or the conductor unreachable: settle from the hypervisors, never guess.
            if isinstance(exc, TRANSIENT_ERRORS):
                bound.error("live_migration_outage", stage=job.stage.value, error=short(exc))
            else:
                bound.exception("live_migration_failed_unexpectedly", stage=job.stage.value)
            reason = f"{type(exc).__name__}: {exc}"
            try:
                return await self._settle(ctxt, instance, migration, reason)
            except (exception.FleetException, MessagingError) as lost:  # outages included
                # Not even the settlement can be recorded now: the resolver keeps trying (a
                # defined end, never a migration left "running" with nobody on it).
                bound.error("live_migration_settle_deferred", error=short(lost))
                self.resolver.retry_later(instance.uuid, migration.uuid, "source")
                return outcome(MigrationStatus.ERROR, reason, None)

    async def _migrate(
        self,
        ctxt: RequestContext,
        job: Job,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        migration = await self.calls.call(
            "read migration", lambda: Migration.get_by_uuid(ctxt, migration.uuid)
        )
        instance = await self.calls.call(
            "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
        )
        dest = migration.dest_compute
        if migration.status not in STARTABLE:
            return outcome(migration.status, "migration is not waiting to start", instance.host)
        if instance.host != self.host or instance.task_state != TaskState.MIGRATING or not dest:
            reason = (
                f"instance not migrating from {self.host} (host={instance.host}, "
                f"task_state={instance.task_state}, dest={dest})"
            )
            await self.records.set_status(migration, MigrationStatus.ERROR)
            return outcome(MigrationStatus.ERROR, reason, instance.host)
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.settings.max_concurrent)
        async with self._semaphore:
            return await self._migrate_now(ctxt, job, instance, migration, dest, migrate_data)

    async def _migrate_now(
        self,
        ctxt: RequestContext,
        job: Job,
        instance: Instance,
        migration: Migration,
        dest: str,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        settings = self.settings
        long_call = {
            "call_monitor_timeout": settings.call_monitor_timeout,
            "timeout": settings.long_call_timeout,
        }
        if job.abort_requested or migration.uuid in self.jobs.early_aborts:
            self.jobs.early_aborts.discard(migration.uuid)
            return await self._end_on_source(
                ctxt, instance, migration, MigrationStatus.CANCELLED, "aborted while queued"
            )
        await self.notifier.emit(
            ctxt, instance, "instance.live_migration_pre.start", extra=notification_extra(migration)
        )
        job.stage = Stage.PREPARING
        await self.records.set_status(migration, MigrationStatus.PREPARING)
        try:
            await self.compute.pre_live_migration(
                ctxt,
                dest,
                instance=instance,
                migration=migration,
                migrate_data=migrate_data,
                **long_call,
            )
        except Exception as exc:
            return await self._roll_back(
                ctxt, instance, migration, MigrationStatus.FAILED, f"pre_live_migration: {exc}"
            )
        if job.abort_requested:
            return await self._roll_back(
                ctxt, instance, migration, MigrationStatus.CANCELLED, "aborted while preparing"
            )
        job.stage = Stage.COPYING
        await self.records.set_status(migration, MigrationStatus.RUNNING)
        try:
            async with instance_event(
                ctxt, instance.uuid, "compute_live_migration", self.host, calls=self.calls
            ):
                await self.driver.live_migration(
                    instance, dest, migrate_data, progress_saver(instance, migration, self.settings)
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            phase = await self.resolver.local_phase(instance.uuid)
            if phase is not GuestPhase.MIGRATED_OUT:
                aborted = isinstance(exc, MigrationAborted) and job.abort_requested
                status = MigrationStatus.CANCELLED if aborted else MigrationStatus.FAILED
                reason = (
                    f"aborted by request: {job.abort_reason or 'no reason given'}"
                    if aborted
                    else f"{type(exc).__name__}: {exc}"
                )
                return await self._roll_back(ctxt, instance, migration, status, reason)
            log.warning("live_migration_raised_after_switch_over", error=repr(exc))
        job.stage = Stage.POST
        return await self._finish_forward(ctxt, instance, migration, dest)

    async def _finish_forward(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, dest: str
    ) -> dict[str, Any]:
        """After the switch-over: resume on the destination first, then clean the source."""
        await self.records.set_status(migration, MigrationStatus.POST_MIGRATING)
        try:
            reply = await self.compute.post_live_migration_at_destination(
                ctxt,
                dest,
                instance=instance,
                migration=migration,
                call_monitor_timeout=self.settings.call_monitor_timeout,
                timeout=self.settings.long_call_timeout,
            )
        except Exception as exc:
            # Unknown: the destination may have resumed the guest. Decide from both phases.
            return await self._settle(ctxt, instance, migration, f"post at destination: {exc}")
        if not reply.get("ok"):
            # The destination removed its guest: the paused copy here is the only one left.
            await self.driver.rollback_live_migration_at_source(instance)
            return await self._end_on_source(
                ctxt,
                instance,
                migration,
                MigrationStatus.ERROR,
                f"post_live_migration_at_destination on {dest}: {reply.get('reason')}",
            )
        try:
            await self.driver.post_live_migration(instance)
        except VirtError:
            # The guest already runs on the destination; this host's recovery cleans the copy.
            log.exception("post_live_migration_cleanup_failed", instance_uuid=instance.uuid)
        self.tracker.release(instance.uuid)
        await self.records.set_status(migration, MigrationStatus.COMPLETED)
        await self.records.finish_action(ctxt, instance.uuid, None)
        await self.notifier.emit(
            ctxt, instance, "instance.live_migration_post.end", extra=notification_extra(migration)
        )
        log.info("live_migration_completed", instance_uuid=instance.uuid, dest=dest)
        return outcome(MigrationStatus.COMPLETED, None, dest)

    async def _roll_back(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        status: str,
        reason: str,
    ) -> dict[str, Any]:
        """Before the switch-over: remove the destination's guest, keep the one here."""
        dest = migration.dest_compute or ""
        try:
            await self.compute.rollback_live_migration_at_destination(
                ctxt,
                dest,
                instance=instance,
                migration=migration,
                call_monitor_timeout=self.settings.call_monitor_timeout,
                timeout=self.settings.long_call_timeout,
            )
        except Exception as exc:
            # The guest never left this host, so ending here is safe; the destination's own
            # recovery removes its incoming guest when it answers again.
            log.warning(
                "rollback_at_destination_failed", instance_uuid=instance.uuid, error=str(exc)
            )
        await self.notifier.emit(
            ctxt,
            instance,
            "instance.live_migration_rollback.end",
            fault=reason,
            extra=notification_extra(migration),
        )
        return await self._end_on_source(ctxt, instance, migration, status, reason)

    async def _end_on_source(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        status: str,
        reason: str,
    ) -> dict[str, Any]:
        instance.task_state = None
        instance.power_state = PowerState.RUNNING
        instance.progress = 0  # nothing moved
        try:
            await self.calls.save(ctxt, "roll back instance", instance, [TaskState.MIGRATING])
        except exception.UnexpectedTaskStateError:
            log.info("rollback_instance_already_settled", instance_uuid=instance.uuid)
        await self.records.set_status(migration, status)
        if status != MigrationStatus.CANCELLED:
            await self.records.fault(ctxt, instance.uuid, f"Live migration {status}: {reason}")
        await self.records.finish_action(ctxt, instance.uuid, "Error")
        log.warning(
            "live_migration_rolled_back",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
            status=status,
            reason=reason,
        )
        return outcome(status, reason, self.host)

    async def _settle(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, reason: str
    ) -> dict[str, Any]:
        """Unknown outcome: decide from both hypervisors now, or mark error and keep trying."""
        settled: Settlement | None = await self.resolver.settle(
            ctxt, instance.uuid, migration.uuid, "source", reason=reason
        )
        if settled is None:
            current = await self.calls.call(
                "read migration", lambda: Migration.get_by_uuid(ctxt, migration.uuid)
            )
            if not current.is_finished:
                await self.records.set_status(current, MigrationStatus.ERROR)
            await self.records.fault(
                ctxt,
                instance.uuid,
                f"Live migration to {migration.dest_compute} interrupted ({reason}); the "
                "instance is settled when both agents answer again",
            )
            self.resolver.retry_later(instance.uuid, migration.uuid, "source")
            return outcome(MigrationStatus.ERROR, reason, None)
        await self.records.finish_action(
            ctxt, instance.uuid, None if settled.completed else "Error"
        )
        return outcome(settled.status, reason, settled.host)
