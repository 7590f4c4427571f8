"""Live migration on the agent: both halves of the protocol, driven by the source.

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
by ``MigrationResolver`` from both hypervisors' phases, now if the peer answers, otherwise when
it does (retried here, and by the peer's own recovery at its restart).

A cancelled migration task (agent stopping past its grace period) is treated like a crash:
nothing is undone, the next start's recovery settles it.

Database and broker outages: every conductor call of both halves is retried through an outage
(``compute_agent/transient.py``); progress saves are skipped instead (the next one catches
up). A source flow that still fails on an outage is settled from the hypervisors like any
unknown outcome, and when even that cannot be recorded the resolver retries it until it can.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import os
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from compute_agent.instance_events import instance_event
from compute_agent.migration_recovery import (
    BUSY,
    MigrationResolver,
    Settlement,
    recover_migrations,
)
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.transient import TRANSIENT_ERRORS, Retrier, short
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import (
    InstanceNotFound,
    MigrationAborted,
    MigrationPreCheckError,
    NoActiveMigration,
    VirtError,
)
from compute_agent.virt.models import GuestPhase, MigrationProgress
from shared_objects import exception, releases
from shared_objects.context import RequestContext, admin_context
from shared_objects.exception import InsufficientResources as ClaimRefused
from shared_objects.fields import MigrationStatus, MigrationType, PowerState, TaskState
from shared_objects.messaging import ExpectedException, MessagingError
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.migration import Migration, MigrationList
from shared_objects.rpc_clients.compute import ComputeAPI

log = structlog.get_logger(__name__)

STARTABLE = (MigrationStatus.ACCEPTED, MigrationStatus.QUEUED)


@dataclasses.dataclass(slots=True)
class LiveMigrationSettings:
    """Timeouts and limits of the agent's live-migration flow."""

    #: Call-monitor window of long calls to peers: a peer silent this long is taken as dead.
    #: Heartbeats come every half of it (whole seconds; at least 2 s to get any).
    call_monitor_timeout: float = 10.0
    #: Overall bound of a long call (a slow but alive peer may take this long).
    long_call_timeout: float = 6 * 3600.0
    #: Plain calls: abort, force-complete.
    rpc_timeout: float = 30.0
    #: Asking a peer for its guest's phase (recovery): short, so a start with a dead peer
    #: is not held up; an unanswered question is simply asked again later.
    phase_query_timeout: float = 5.0
    #: Minimum seconds between two progress saves (the final report is always saved).
    progress_interval: float = 0.5
    #: Copies running at once with this host as source; the rest wait in ``queued``.
    max_concurrent: int = 16
    #: Migrations from this host accepted at once (each holds an RPC handler slot for its
    #: whole duration: keep it well below the server's ``max_concurrency``). Beyond it the
    #: source precheck refuses.
    max_in_flight: int = 32
    #: Seconds between attempts to settle a migration whose peer did not answer.
    settle_retry_interval: float = 5.0
    #: How long to keep trying to reach the copy when an abort/force arrives at its very start.
    control_grace: float = 2.0
    #: A migration from this host still ``accepted``/``queued`` this many seconds after its
    #: last change, with no job here, lost its conductor: it is settled (ends ``error``).
    orphan_after: float = 900.0
    #: Seconds between two looks for such orphans.
    orphan_check_interval: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LiveMigrationSettings:
        """Defaults, overridden by ``FLEET_LIVE_MIGRATION_<FIELD>`` variables (upper case)."""
        env = os.environ if environ is None else environ
        settings = cls()
        for field in dataclasses.fields(cls):
            raw = env.get(f"FLEET_LIVE_MIGRATION_{field.name.upper()}")
            if raw is not None:
                setattr(settings, field.name, type(getattr(settings, field.name))(raw))
        return settings


class Stage(enum.StrEnum):
    """Where a source-side migration is, for abort and force-complete."""

    QUEUED = "queued"
    PREPARING = "preparing"
    COPYING = "copying"
    POST = "post"


@dataclasses.dataclass(slots=True)
class _Job:
    instance_uuid: str
    stage: Stage = Stage.QUEUED
    abort_requested: bool = False
    abort_reason: str | None = None
    task: asyncio.Task[dict[str, Any]] | None = None


def _extra(migration: Migration) -> dict[str, Any]:
    """Migration fields added to ``instance.live_migration_*`` notification payloads."""
    return {
        "migration_uuid": migration.uuid,
        "source_compute": migration.source_compute,
        "dest_compute": migration.dest_compute,
    }


def _outcome(status: str, reason: str | None = None, host: str | None = None) -> dict[str, Any]:
    return {"status": status, "reason": reason, "host": host}


class LiveMigrationManager:
    """Source and destination halves of live migration on one host."""

    def __init__(
        self,
        host: str,
        driver: ComputeDriver,
        tracker: ResourceTracker,
        compute: ComputeAPI,
        notifier: InstanceNotifier,
        settings: LiveMigrationSettings | None = None,
        calls: Retrier | None = None,
    ) -> None:
        self.host = host
        self.driver = driver
        self.tracker = tracker
        self.compute = compute
        self.notifier = notifier
        self.settings = settings or LiveMigrationSettings.from_env()
        self.calls = calls if calls is not None else Retrier()
        self.resolver = MigrationResolver(
            host, driver, tracker, compute, self.settings, calls=self.calls
        )
        self._jobs: dict[str, _Job] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._early_aborts: set[str] = set()
        #: Asked before each sweep reads this host's migrations (the service wires it to its
        #: beat, which learns from the conductor whether a migration from here waits).
        self.sweep_wanted: Callable[[], bool] = lambda: True

    # --- lifecycle ------------------------------------------------------------------------

    async def recover(self, ctxt: RequestContext, instances: list[Instance]) -> list[Instance]:
        """At start, before claims are computed: settle interrupted migrations on this host.

        Returns the instances this host must hold claims for afterwards.
        """
        return await recover_migrations(ctxt, self.resolver, instances)

    def start(self) -> None:
        """After the RPC server started: keep retrying what recovery could not settle yet,
        and look for migrations whose conductor vanished before handing them over."""
        self.resolver.start_retrying()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="live-migration-sweep")

    async def stop(self) -> None:
        """Cancel what still runs after the RPC server's grace: the next start settles it."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        await self.resolver.stop()
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def running(self) -> dict[str, str]:
        """``{migration uuid: stage}`` of source-side migrations in flight here."""
        return {uuid: job.stage.value for uuid, job in self._jobs.items()}

    # --- destination: checks --------------------------------------------------------------

    async def check_can_live_migrate_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, source_host: str
    ) -> dict[str, Any]:
        """Can this host take the instance? Asks the source in turn; returns the migrate data."""
        log.info(
            "live_migration_check_destination",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
            source=source_host,
        )
        async with instance_event(
            ctxt, instance.uuid, "compute_check_can_live_migrate_destination", self.host
        ):
            dest_data = await self.driver.check_can_live_migrate_destination(instance, source_host)
            self._check_claim_fits(instance)
            dest_data["dest_node"] = self.tracker.nodename
            settings = self.settings
            return await self.compute.check_can_live_migrate_source(
                ctxt,
                source_host,
                instance=instance,
                dest_check_data=dest_data,
                call_monitor_timeout=settings.call_monitor_timeout,
                timeout=settings.rpc_timeout,
            )

    def _check_claim_fits(self, instance: Instance) -> None:
        """The tracker's view, without holding anything (the claim comes in pre_live_migration)."""
        claims = self.tracker.claims
        if claims.holds(instance.uuid):
            raise MigrationPreCheckError(
                uuid=instance.uuid, reason=f"already claimed on {self.host}"
            )
        used = claims.usage
        max_vcpus, max_ram, max_disk = claims.capacity.limits
        if (
            used.vcpus + instance.vcpus > max_vcpus
            or used.memory_mb + instance.memory_mb > max_ram
            or used.disk_gb + instance.root_gb > max_disk
        ):
            raise MigrationPreCheckError(
                uuid=instance.uuid, reason=f"not enough free capacity on {self.host}"
            )

    async def check_can_live_migrate_source(
        self, ctxt: RequestContext, instance: Instance, dest_check_data: dict[str, Any]
    ) -> dict[str, Any]:
        """Can the guest leave this host? Returns the migrate data for the destination."""
        if instance.host != self.host:
            raise MigrationPreCheckError(
                uuid=instance.uuid, reason=f"instance is on {instance.host}, not {self.host}"
            )
        if len(self._jobs) >= self.settings.max_in_flight:
            raise MigrationPreCheckError(
                uuid=instance.uuid,
                reason=f"{self.host} already runs {len(self._jobs)} outgoing live migrations",
            )
        async with instance_event(
            ctxt, instance.uuid, "compute_check_can_live_migrate_source", self.host
        ):
            return await self.driver.check_can_live_migrate_source(instance, dest_check_data)

    # --- destination: the guest arrives ---------------------------------------------------

    async def pre_live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        """Claim here and create the paused incoming guest (volumes, firewall)."""
        log.info(
            "live_migration_pre_destination",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
        )
        async with instance_event(
            ctxt, instance.uuid, "compute_pre_live_migration", self.host, calls=self.calls
        ):
            await self.tracker.claim(instance)
            try:
                return await self.driver.pre_live_migration(instance, migrate_data)
            except Exception:
                self.tracker.release(instance.uuid)
                raise

    async def post_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> dict[str, Any]:
        """Resume the guest here and move the instance to this host (a CAS on ``migrating``).

        Returns ``{"ok": True}``, or ``{"ok": False, "rolled_back": True, "reason": ...}`` when
        the guest could not be resumed and was removed from here (the source may resume it).
        Raises when the outcome is unknown; the source then settles from both phases.
        """
        current = await self.calls.call(
            "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
        )
        if current.host == self.host and current.task_state is None:
            return {"ok": True}  # a redelivery, or recovery got here first
        try:
            async with instance_event(
                ctxt,
                instance.uuid,
                "compute_post_live_migration_at_destination",
                self.host,
                calls=self.calls,
            ):
                await self.driver.post_live_migration_at_destination(instance)
        except VirtError as exc:
            log.warning("post_at_destination_failed", instance_uuid=instance.uuid, error=str(exc))
            # Backward order: remove the incoming guest before the source resumes its copy.
            await self.driver.rollback_live_migration_at_destination(instance)
            self.tracker.release(instance.uuid)
            return {"ok": False, "rolled_back": True, "reason": f"{type(exc).__name__}: {exc}"}
        await self.hold_claim(instance)
        await self.resolver.move_instance_here(ctxt, current, migration)
        await self.notifier.emit(
            ctxt, current, "instance.live_migration_post_dest.end", extra=_extra(migration)
        )
        return {"ok": True}

    async def rollback_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> None:
        """Remove the incoming guest (idempotent) and release the claim.

        Only while the instance is still the source's and migrating: once it has moved here the
        guest on this host is the only running copy, and a (late, repeated or forged) rollback
        must not destroy it. The compare-and-swap on ``migrating`` checks that at the moment
        we act."""
        calls = self.calls
        migration = await calls.call(
            "read migration", lambda: Migration.get_by_uuid(ctxt, migration.uuid)
        )
        current = await calls.call(
            "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
        )
        if current.host == self.host or current.host != migration.source_compute:
            log.warning(
                "rollback_at_destination_refused",
                instance_uuid=instance.uuid,
                host=current.host,
                source=migration.source_compute,
            )
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"instance {instance.uuid} is on {current.host}: nothing to roll back"
                )
            )
        # Changes nothing: a retry after a lost reply asks the same question again.
        await calls.save(ctxt, "check migrating", current, [TaskState.MIGRATING])
        async with instance_event(
            ctxt,
            instance.uuid,
            "compute_rollback_live_migration_at_destination",
            self.host,
            calls=calls,
        ):
            await self.driver.rollback_live_migration_at_destination(instance)
            self.tracker.release(instance.uuid)

    async def hold_claim(self, instance: Instance) -> None:
        """Claim for a guest that is already here: over-commit is logged, never refused."""
        try:
            await self.tracker.claim(instance)
        except ClaimRefused:
            log.error("claim_over_capacity_for_present_guest", instance_uuid=instance.uuid)

    # --- source: the migration ------------------------------------------------------------

    async def live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the migration (once per Migration, even if the call is redelivered) to its end."""
        job = self._jobs.get(migration.uuid)
        if job is None:
            job = _Job(instance.uuid)
            job.task = asyncio.create_task(
                self._run_source(ctxt, job, instance, migration, migrate_data),
                name=f"live-migration-{migration.uuid}",
            )
            self._jobs[migration.uuid] = job
            job.task.add_done_callback(lambda _t: self._jobs.pop(migration.uuid, None))
        assert job.task is not None
        # The handler may be cancelled (server stopping); the migration itself goes on.
        return await asyncio.shield(job.task)

    async def _run_source(
        self,
        ctxt: RequestContext,
        job: _Job,
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
                return _outcome(MigrationStatus.ERROR, reason, None)

    async def _migrate(
        self,
        ctxt: RequestContext,
        job: _Job,
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
            return _outcome(migration.status, "migration is not waiting to start", instance.host)
        if instance.host != self.host or instance.task_state != TaskState.MIGRATING or not dest:
            reason = (
                f"instance not migrating from {self.host} (host={instance.host}, "
                f"task_state={instance.task_state}, dest={dest})"
            )
            await self._set_status(migration, MigrationStatus.ERROR)
            return _outcome(MigrationStatus.ERROR, reason, instance.host)
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.settings.max_concurrent)
        async with self._semaphore:
            return await self._migrate_now(ctxt, job, instance, migration, dest, migrate_data)

    async def _migrate_now(
        self,
        ctxt: RequestContext,
        job: _Job,
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
        if job.abort_requested or migration.uuid in self._early_aborts:
            self._early_aborts.discard(migration.uuid)
            return await self._end_on_source(
                ctxt, instance, migration, MigrationStatus.CANCELLED, "aborted while queued"
            )
        await self.notifier.emit(
            ctxt, instance, "instance.live_migration_pre.start", extra=_extra(migration)
        )
        job.stage = Stage.PREPARING
        await self._set_status(migration, MigrationStatus.PREPARING)
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
        await self._set_status(migration, MigrationStatus.RUNNING)
        try:
            async with instance_event(
                ctxt, instance.uuid, "compute_live_migration", self.host, calls=self.calls
            ):
                await self.driver.live_migration(
                    instance, dest, migrate_data, self._progress_saver(instance, migration)
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            phase = await self._phase(instance.uuid)
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
        await self._set_status(migration, MigrationStatus.POST_MIGRATING)
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
        await self._set_status(migration, MigrationStatus.COMPLETED)
        await self._finish_action(ctxt, instance.uuid, None)
        await self.notifier.emit(
            ctxt, instance, "instance.live_migration_post.end", extra=_extra(migration)
        )
        log.info("live_migration_completed", instance_uuid=instance.uuid, dest=dest)
        return _outcome(MigrationStatus.COMPLETED, None, dest)

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
            extra=_extra(migration),
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
        await self._set_status(migration, status)
        if status != MigrationStatus.CANCELLED:
            await self._fault(ctxt, instance.uuid, f"Live migration {status}: {reason}")
        await self._finish_action(ctxt, instance.uuid, "Error")
        log.warning(
            "live_migration_rolled_back",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
            status=status,
            reason=reason,
        )
        return _outcome(status, reason, self.host)

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
                await self._set_status(current, MigrationStatus.ERROR)
            await self._fault(
                ctxt,
                instance.uuid,
                f"Live migration to {migration.dest_compute} interrupted ({reason}); the "
                "instance is settled when both agents answer again",
            )
            self.resolver.retry_later(instance.uuid, migration.uuid, "source")
            return _outcome(MigrationStatus.ERROR, reason, None)
        await self._finish_action(ctxt, instance.uuid, None if settled.completed else "Error")
        return _outcome(settled.status, reason, settled.host)

    # --- source: progress, abort, force ---------------------------------------------------

    def _progress_saver(self, instance: Instance, migration: Migration) -> Any:
        loop = asyncio.get_running_loop()
        last = [float("-inf")]

        async def save(progress: MigrationProgress) -> None:
            now = loop.time()
            final = progress.percent >= 100
            if not final and now - last[0] < self.settings.progress_interval:
                return
            last[0] = now
            migration.memory_total = progress.memory_total
            migration.memory_processed = progress.memory_processed
            migration.memory_remaining = progress.memory_remaining
            if not migration.obj_attr_is_set("disk_total") or migration.disk_total is None:
                # Migration 1.1: the local disk travels too. The fake hypervisor moves it
                # with the incoming guest in pre_live_migration, so it is complete by now.
                disk = instance.root_gb * 1024**3
                migration.disk_total = disk
                migration.disk_processed = disk
                migration.disk_remaining = 0
            try:
                await migration.save()
                if instance.progress != progress.percent:
                    instance.progress = progress.percent
                    await instance.save(expected_task_state=[TaskState.MIGRATING])
            except TRANSIENT_ERRORS as exc:
                # Progress is a report, not a state: an outage must not fail a healthy copy.
                # The next report carries the totals again (fields still marked changed).
                log.warning("live_migration_progress_not_saved", error=short(exc))

        return save

    def _job_for(self, migration_uuid: str) -> _Job:
        job = self._jobs.get(migration_uuid)
        if job is None:
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"migration {migration_uuid} is not running on {self.host}"
                )
            )
        return job

    async def live_migration_abort(
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        """Stop the migration; the guest stays here. Too late once the switch-over began.

        ``reason`` (compute RPC 1.1) ends up in the fault that records the cancellation."""
        if migration_uuid not in self._jobs:
            migration = await Migration.get_by_uuid(ctxt, migration_uuid)
            if (
                migration_uuid not in self._jobs  # still, after the await
                and migration.source_compute == self.host
                and migration.status in STARTABLE
            ):
                # Queued by the conductor, its call not taken up here yet: remember it.
                self._early_aborts.add(migration_uuid)
                log.info("live_migration_abort_before_start", migration_uuid=migration_uuid)
                return
        job = self._job_for(migration_uuid)
        if job.stage is Stage.POST:
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"migration {migration_uuid} is past the switch-over; cannot abort"
                )
            )
        job.abort_requested = True
        job.abort_reason = reason
        if job.stage is Stage.COPYING:
            await self._control(job, migration_uuid, self.driver.live_migration_abort)
        log.info("live_migration_abort_requested", migration_uuid=migration_uuid)

    async def live_migration_force_complete(
        self, ctxt: RequestContext, migration_uuid: str
    ) -> None:
        """Pause the guest so the copy converges (only while copying)."""
        job = self._job_for(migration_uuid)
        if job.stage is not Stage.COPYING:
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"migration {migration_uuid} is not copying memory ({job.stage.value})"
                )
            )
        await self._control(job, migration_uuid, self.driver.live_migration_force_complete)
        log.info("live_migration_force_complete_requested", migration_uuid=migration_uuid)

    async def _control(self, job: _Job, migration_uuid: str, action: Any) -> None:
        # The copy may be registering in the driver right now: retry briefly before refusing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.control_grace
        while True:
            try:
                await action(job.instance_uuid)
                return
            except NoActiveMigration as exc:
                if job.stage is not Stage.COPYING or loop.time() > deadline:
                    raise ExpectedException(
                        exception.InvalidRequest(
                            reason=f"migration {migration_uuid} has no copy in progress"
                        )
                    ) from exc
            await asyncio.sleep(0.02)

    # --- orphans: a conductor that died before handing the migration over -----------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.orphan_check_interval)
            if not self.sweep_wanted():
                continue
            try:
                await self.sweep_orphans(admin_context(releases.BINARY_COMPUTE))
            except (exception.FleetException, MessagingError, VirtError):
                log.exception("live_migration_sweep_failed")

    async def sweep_orphans(self, ctxt: RequestContext) -> int:
        """Settle migrations from this host stuck before the hand-over; returns how many."""
        now = datetime.datetime.now(datetime.UTC)
        limit = datetime.timedelta(seconds=self.settings.orphan_after)
        running = {job.instance_uuid for job in self._jobs.values()}
        settled = 0
        for migration in await MigrationList.get_in_progress_by_host(ctxt, self.host):
            if (
                migration.source_compute != self.host
                or migration.migration_type != MigrationType.LIVE_MIGRATION
                or migration.status not in STARTABLE
                or migration.instance_uuid in running
            ):
                continue
            changed = migration.updated_at or migration.created_at
            if changed is None or now - changed < limit:
                continue
            log.warning("live_migration_orphaned", migration_uuid=migration.uuid)
            result = await self.resolver.settle(
                ctxt,
                migration.instance_uuid,
                migration.uuid,
                "source",
                reason=f"not handed over within {self.settings.orphan_after:g}s (conductor lost)",
            )
            settled += result is not None
        return settled

    # --- recovery support -----------------------------------------------------------------

    async def get_live_migration_guest(
        self, ctxt: RequestContext, instance_uuid: str
    ) -> str | None:
        """This hypervisor's phase of the guest (None when absent), or ``"busy"`` while a
        migration job of this host drives it (the peer's recovery then leaves it alone)."""
        if any(job.instance_uuid == instance_uuid for job in self._jobs.values()):
            return BUSY
        phase = await self._phase(instance_uuid)
        return None if phase is None else phase.value

    async def settle_live_migration_peer(
        self, ctxt: RequestContext, instance: Instance, steps: list[str], owner: str | None
    ) -> None:
        """Recovery on the peer asks this host to run its share of a resolution."""
        await self.resolver.apply_local(instance, steps, owner)

    # --- helpers --------------------------------------------------------------------------

    async def _phase(self, uuid: str) -> GuestPhase | None:
        try:
            return (await self.driver.get_info(uuid)).phase
        except InstanceNotFound:
            return None

    async def _set_status(self, migration: Migration, status: str) -> None:
        # Writes the same value again on a retry: idempotent as it stands.
        migration.status = status
        await self.calls.call(f"migration {status}", migration.save, migration_uuid=migration.uuid)

    async def _fault(self, ctxt: RequestContext, instance_uuid: str, message: str) -> None:
        fault = InstanceFault(
            ctxt, instance_uuid=instance_uuid, code=500, message=message[:255], host=self.host
        )
        await self.calls.call("record fault", fault.create, instance_uuid=instance_uuid)

    async def _finish_action(
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
