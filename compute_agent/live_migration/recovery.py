"""Recovery of live migrations on the agent: at start, and for migrations nobody drives.

* ``recover_migrations`` runs once at start, before claims are computed: every live migration
  this host took part in and a crash cut is settled from both hypervisors (``resolver.py``);
* ``OrphanSweep`` looks, every ``orphan_check_interval`` seconds, for migrations from this host
  still ``accepted``/``queued`` long after their last change with no job here: their conductor
  died before handing them over, so they are settled (they end ``error``).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable

import structlog

from compute_agent.live_migration.jobs import STARTABLE, Jobs
from compute_agent.live_migration.resolver import MigrationResolver, Role
from compute_agent.live_migration.settings import LiveMigrationSettings
from compute_agent.transient import TRANSIENT_ERRORS
from compute_agent.virt.exceptions import VirtError
from compute_agent.virt.models import GuestPhase
from shared_objects import exception, releases
from shared_objects.context import RequestContext, admin_context
from shared_objects.fields import MigrationType, TaskState
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.migration import Migration, MigrationList
from shared_objects.runtime.messaging import MessagingError

log = structlog.get_logger(__name__)


async def recover_migrations(
    ctxt: RequestContext, resolver: MigrationResolver, instances: list[Instance]
) -> list[Instance]:
    """At agent start: settle every live migration this host took part in and a crash cut.

    Candidates come from the database (instances here still ``migrating``) and from the
    hypervisor (paused copies: ``migrated_out`` here as source, ``incoming`` as destination,
    and running guests the database places elsewhere). Returns the instances to hold claims
    for: those the database now places here, plus incoming guests still undecided.
    """
    host = resolver.host
    guests = {g.uuid: g for g in await resolver.driver.list_guests()}
    here = {i.uuid: i for i in instances}
    candidates: dict[str, Role] = {}
    for instance in instances:
        if instance.task_state == TaskState.MIGRATING:
            candidates[instance.uuid] = "source"
    for uuid, guest in guests.items():
        if guest.phase is GuestPhase.MIGRATED_OUT:
            candidates[uuid] = "source"
        elif guest.phase is GuestPhase.INCOMING:
            candidates[uuid] = "dest"
        elif guest.owns_guest and uuid not in here:
            candidates.setdefault(uuid, "dest")
    # Unfinished migrations this host takes part in, e.g. a destination whose guest already
    # runs and is placed here while the source still holds its paused copy.
    for migration in await MigrationList.get_in_progress_by_host(ctxt, host):
        if migration.migration_type != MigrationType.LIVE_MIGRATION:
            continue
        role: Role = "dest" if migration.dest_compute == host else "source"
        candidates.setdefault(migration.instance_uuid, role)

    async def recover_one(uuid: str, role: Role) -> None:
        migration: Migration | None = None
        try:
            migration = await resolver.calls.call(
                "find migration", lambda: resolver.find_migration(ctxt, uuid, role)
            )
            if migration is None and uuid not in here:
                # A running guest the row places elsewhere was guessed a destination; it may
                # be the source's copy of a migration the conductor settled on the other host.
                other: Role = "source" if role == "dest" else "dest"
                migration = await resolver.calls.call(
                    "find migration", lambda: resolver.find_migration(ctxt, uuid, other)
                )
                role = other if migration is not None else role
            if migration is None:
                await _clear_orphan_task_state(ctxt, here.get(uuid))
                return
            settled = await resolver.settle(
                ctxt, uuid, migration.uuid, role, reason=f"compute agent {host} restarted"
            )
            if settled is None:
                resolver.retry_later(uuid, migration.uuid, role)
        except TRANSIENT_ERRORS as exc:
            # An outage outlasted the retries: settle it later, once the agent serves.
            log.warning("migration_recovery_deferred", instance_uuid=uuid, error=str(exc)[:200])
            if migration is not None:
                resolver.retry_later(uuid, migration.uuid, role)
        except (exception.FleetException, MessagingError, VirtError):
            log.exception("migration_recovery_failed", instance_uuid=uuid, role=role)

    await asyncio.gather(*(recover_one(u, r) for u, r in candidates.items()))
    claimed = list(await InstanceList.get_by_host(ctxt, host))
    known = {i.uuid for i in claimed}
    for uuid in candidates:
        if uuid not in known and await resolver.local_phase(uuid) is GuestPhase.INCOMING:
            try:
                claimed.append(await Instance.get_by_uuid(ctxt, uuid))
            except exception.InstanceNotFound:
                log.warning("incoming_guest_without_instance", instance_uuid=uuid)
    if candidates:
        log.info("migration_recovery_done", host=host, candidates=len(candidates))
    return claimed


async def _clear_orphan_task_state(ctxt: RequestContext, instance: Instance | None) -> None:
    if instance is None or instance.task_state != TaskState.MIGRATING:
        return
    instance.task_state = None
    try:
        await instance.save(expected_task_state=[TaskState.MIGRATING])
    except exception.UnexpectedTaskStateError:
        return
    log.warning("migrating_task_state_cleared_without_migration", instance_uuid=instance.uuid)


class OrphanSweep:
    """Settles migrations from this host that their conductor never handed over."""

    def __init__(
        self, host: str, resolver: MigrationResolver, settings: LiveMigrationSettings, jobs: Jobs
    ) -> None:
        self.host = host
        self.resolver = resolver
        self.settings = settings
        self.jobs = jobs
        self._task: asyncio.Task[None] | None = None
        #: Asked before each sweep reads this host's migrations: the service wires it to its
        #: beat, whose ``report_alive`` answer says whether a migration from here waits
        #: (compute_agent/liveness.py); most minutes nothing does, and nothing is read.
        self.wanted: Callable[[], bool] = lambda: True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="live-migration-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.orphan_check_interval)
            if not self.wanted():
                continue
            try:
                await self.sweep_orphans(admin_context(releases.BINARY_COMPUTE))
            except (exception.FleetException, MessagingError, VirtError):
                log.exception("live_migration_sweep_failed")

    async def sweep_orphans(self, ctxt: RequestContext) -> int:
        """Settle migrations from this host stuck before the hand-over; returns how many."""
        now = datetime.datetime.now(datetime.UTC)
        limit = datetime.timedelta(seconds=self.settings.orphan_after)
        running = self.jobs.instance_uuids
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
