"""Settling live migrations whose outcome is not known: after a crash, or a peer gone silent.

The hypervisors decide, not the database: ``virt.recovery.resolve_migration`` maps the guest's
phase on the source and on the destination to an outcome and the driver steps that reach it
(destination steps first, then the source's). This module gathers the phases (its own driver,
the peer's over RPC), runs the steps on each side, then makes the database agree: instance on
the host that runs the guest, ``task_state`` None, Migration ``completed`` if the guest moved,
``error`` otherwise, claims held only where the guest lives.

When the peer does not answer, only what one side can prove alone is decided:

* a source whose guest is in an owner phase (running) keeps it — the destination can only run
  the guest after the source switched over, which this source has not (or has undone);
* a destination whose guest runs owns it — it resumed only after the source switched over.

Anything else (a paused copy on either side) waits: it is retried every
``settle_retry_interval`` seconds, and the peer's own recovery settles it when it starts.

A migration the conductor's reconciler settled while both hosts were down (``failed`` or
``error``, the instance no longer ``migrating``) is not decided again: no agent may move the
instance any more, so the row's host is the answer. The copy there survives (resumed if it is
a paused half, once no other copy is left); the other host removes its own copy, releases its
claim and logs ``settled_migration_copy_removed``, but only after the row's host said it holds
the guest. When it does not, every copy is left and ``settled_migration_guest_missing`` is
logged at ERROR for an operator.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Literal

import structlog

from compute_agent.live_migration.settings import LiveMigrationSettings
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.transient import Retrier
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import InstanceNotFound, VirtError
from compute_agent.virt.models import OWNER_PHASES, GuestPhase
from compute_agent.virt.recovery import Outcome, Resolution, resolve_migration
from shared_objects import exception, releases
from shared_objects.context import RequestContext, admin_context
from shared_objects.exception import InsufficientResources as ClaimRefused
from shared_objects.exception import PeerBusy
from shared_objects.fields import MigrationStatus, MigrationType, PowerState, TaskState, VMState
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.migration import Migration, MigrationList
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.runtime.messaging import MessagingError

log = structlog.get_logger(__name__)

Role = Literal["source", "dest"]

#: The driver steps a peer may be asked to run (never a name taken from the wire as is).
PEER_STEPS = frozenset(
    {
        "rollback_live_migration_at_destination",
        "post_live_migration_at_destination",
        "post_live_migration",
        "rollback_live_migration_at_source",
    }
)


#: The step that makes a paused half of a migration run again where it is.
_RESUME = {
    GuestPhase.MIGRATED_OUT: "rollback_live_migration_at_source",
    GuestPhase.INCOMING: "post_live_migration_at_destination",
}

#: What ``get_live_migration_guest`` answers while that host's own job drives the migration.
BUSY = "busy"


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """How a settled migration ended."""

    outcome: Outcome
    status: str
    host: str | None

    @property
    def completed(self) -> bool:
        return self.outcome is Outcome.DEST


class MigrationResolver:
    """Settles this host's side (and asks the peer for its side) of unfinished migrations."""

    def __init__(
        self,
        host: str,
        driver: ComputeDriver,
        tracker: ResourceTracker,
        compute: ComputeAPI,
        settings: LiveMigrationSettings,
        calls: Retrier | None = None,
    ) -> None:
        self.host = host
        # Database and broker outages are ridden out call by call (compute_agent/transient);
        # a settlement that still fails is retried later as a whole (``retry_later``).
        self.calls = calls if calls is not None else Retrier()
        self.driver = driver
        self.tracker = tracker
        self.compute = compute
        self.settings = settings
        self._pending: dict[str, tuple[str, Role]] = {}
        self._retry_task: asyncio.Task[None] | None = None
        self._retrying = False

    # --- phases ---------------------------------------------------------------------------

    async def local_phase(self, uuid: str) -> GuestPhase | None:
        try:
            return (await self.driver.get_info(uuid)).phase
        except InstanceNotFound:
            return None

    async def peer_phase(self, ctxt: RequestContext, peer: str, uuid: str) -> GuestPhase | None:
        """The peer hypervisor's phase; ``MessagingError`` when the peer does not answer,
        ``PeerBusy`` while the peer's own migration job for the guest still runs."""
        raw = await self.compute.get_live_migration_guest(
            ctxt, peer, instance_uuid=uuid, timeout=self.settings.phase_query_timeout
        )
        if raw == BUSY:
            raise PeerBusy(peer)
        return None if raw is None else GuestPhase(raw)

    @staticmethod
    def decide_alone(role: Role, mine: GuestPhase | None) -> Resolution | None:
        """What one side can prove without its peer (see the module docstring)."""
        if mine in OWNER_PHASES:
            if role == "source":
                return Resolution(
                    Outcome.SOURCE, (("dest", "rollback_live_migration_at_destination"),)
                )
            return Resolution(Outcome.DEST, (("source", "post_live_migration"),))
        return None

    # --- settling -------------------------------------------------------------------------

    async def find_migration(
        self, ctxt: RequestContext, instance_uuid: str, role: Role
    ) -> Migration | None:
        """The instance's latest live migration with this host in ``role``."""
        mine = [
            m
            for m in await MigrationList.get_by_instance(ctxt, instance_uuid)
            if m.migration_type == MigrationType.LIVE_MIGRATION
            and (m.source_compute if role == "source" else m.dest_compute) == self.host
        ]
        return max(mine, key=lambda m: m.id) if mine else None

    async def settle(
        self,
        ctxt: RequestContext,
        instance_uuid: str,
        migration_uuid: str,
        role: Role,
        *,
        reason: str,
    ) -> Settlement | None:
        """Settle one migration; None when it cannot be decided now (retry later)."""
        calls = self.calls
        migration = await calls.call(
            "read migration", lambda: Migration.get_by_uuid(ctxt, migration_uuid)
        )
        try:
            instance = await calls.call(
                "read instance", lambda: Instance.get_by_uuid(ctxt, instance_uuid)
            )
        except exception.InstanceNotFound:
            log.warning("settle_instance_gone", instance_uuid=instance_uuid)
            return Settlement(Outcome.LOST, migration.status, None)
        source, dest = migration.source_compute, migration.dest_compute
        peer = dest if role == "source" else source
        mine = await self.local_phase(instance_uuid)
        peer_known = True
        theirs: GuestPhase | None = None
        if peer:
            try:
                theirs = await self.peer_phase(ctxt, peer, instance_uuid)
            except MessagingError as exc:
                log.info("settle_peer_unreachable", peer=peer, error=str(exc))
                peer_known = False
            except PeerBusy:
                log.info("settle_deferred_peer_busy", peer=peer, instance_uuid=instance_uuid)
                return None
        src_phase, dst_phase = (mine, theirs) if role == "source" else (theirs, mine)
        bound = log.bind(
            instance_uuid=instance_uuid,
            migration_uuid=migration_uuid,
            role=role,
            source_phase=src_phase.value if src_phase else None,
            dest_phase=dst_phase.value if dst_phase else None,
            peer_known=peer_known,
        )
        if migration.is_finished and instance.task_state != TaskState.MIGRATING:
            return await self._follow_row(
                ctxt, instance, migration, peer, mine, theirs, peer_known, bound
            )
        resolution = (
            resolve_migration(src_phase, dst_phase) if peer_known else self.decide_alone(role, mine)
        )
        if resolution is None or resolution.outcome is Outcome.IN_PROGRESS:
            bound.info("settle_deferred", outcome=resolution and resolution.outcome.value)
            return None
        owner = {Outcome.DEST: dest, Outcome.SOURCE: source}.get(resolution.outcome)
        for side in ("dest", "source"):
            steps = [name for s, name in resolution.steps if s == side]
            side_host = dest if side == "dest" else source
            if side == role:
                await self.apply_local(instance, steps, owner)
            elif peer_known and side_host:
                try:
                    await self.compute.settle_live_migration_peer(
                        ctxt,
                        side_host,
                        instance=instance,
                        steps=steps,
                        owner=owner,
                        call_monitor_timeout=self.settings.call_monitor_timeout,
                        timeout=self.settings.long_call_timeout,
                    )
                except MessagingError as exc:
                    bound.warning("settle_peer_step_failed", peer=side_host, error=str(exc))
                    return None
        settlement = await self._record(ctxt, instance, migration, resolution, owner, reason)
        bound.warning("live_migration_settled", outcome=resolution.outcome.value, host=owner)
        return settlement

    async def _follow_row(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        peer: str | None,
        mine: GuestPhase | None,
        theirs: GuestPhase | None,
        peer_known: bool,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> Settlement | None:
        """The migration was settled and the instance released without this host (the
        conductor's reconciler, while both hosts were down): the row's host is final, since
        the ownership scope lets no agent move an instance that is not ``migrating`` any more.
        So the copy on the row's host is the one that survives; every other copy goes, each
        host removing only its own, and only once the row's host is known to hold the guest.
        A paused copy on the row's host is resumed only once no other copy is left (two
        running copies of one guest must never exist). None: ask again later."""
        owner = instance.host
        status = migration.status
        outcome = Outcome.SOURCE if owner == migration.source_compute else Outcome.DEST
        if owner == self.host:
            if mine is None:
                bound.error("settled_migration_guest_missing", host=owner, action="operator")
                return Settlement(Outcome.LOST, status, None)
            resume = _RESUME.get(mine)
            if resume is not None and (not peer_known or theirs is not None):
                bound.info("settled_migration_waits_for_peer", peer=peer)
                return None
            await self.apply_local(instance, [resume] if resume else [], owner)
            bound.warning("live_migration_settled_by_conductor", host=owner, kept=self.host)
            return Settlement(outcome, status, owner)
        if peer is None or owner != peer:
            # The row names a host this one cannot ask: nothing here is proven spare.
            bound.error("settled_migration_on_other_host", host=owner, action="operator")
            return Settlement(Outcome.LOST, status, owner)
        if not peer_known:
            return None
        if theirs is None:
            # The row's host has no copy: the one here may be the last; an operator decides.
            bound.error("settled_migration_guest_missing", host=owner, action="operator")
            return Settlement(Outcome.LOST, status, None)
        if mine is not None:
            await self.driver.destroy(instance)
            if self.tracker.node is not None:
                self.tracker.release(instance.uuid)
            bound.warning("settled_migration_copy_removed", host=self.host, phase=mine.value)
        resume = _RESUME.get(theirs)
        if resume is not None:
            try:
                await self.compute.settle_live_migration_peer(
                    ctxt,
                    owner,
                    instance=instance,
                    steps=[resume],
                    owner=owner,
                    call_monitor_timeout=self.settings.call_monitor_timeout,
                    timeout=self.settings.long_call_timeout,
                )
            except MessagingError as exc:
                bound.warning("settle_peer_step_failed", peer=owner, error=str(exc))
                return None
        bound.warning("live_migration_settled_by_conductor", host=owner, kept=owner)
        return Settlement(outcome, status, owner)

    async def _record(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        resolution: Resolution,
        owner: str | None,
        reason: str,
    ) -> Settlement:
        """Make the database agree with the hypervisors."""
        outcome = resolution.outcome
        if outcome is Outcome.DEST and owner is not None:
            await self.move_instance(ctxt, instance, owner, migration.dest_node or owner)
            status = MigrationStatus.COMPLETED
        else:
            if outcome in (Outcome.LOST, Outcome.CONFLICT):
                instance.vm_state = VMState.ERROR
                instance.power_state = PowerState.NOSTATE
            instance.task_state = None
            try:
                await self.calls.save(ctxt, "settle instance", instance, [TaskState.MIGRATING])
            except exception.UnexpectedTaskStateError:
                log.info("settle_instance_already_idle", instance_uuid=instance.uuid)
            status = MigrationStatus.ERROR
        if outcome is not Outcome.DEST:
            fault = InstanceFault(
                ctxt,
                instance_uuid=instance.uuid,
                code=500,
                message=(
                    f"Live migration {migration.uuid} settled on {owner or 'no host'} "
                    f"({outcome.value}): {reason}"
                )[:255],
                host=self.host,
            )
            await self.calls.call("settle fault", fault.create)
        current = await self.calls.call(
            "read migration", lambda: Migration.get_by_uuid(ctxt, migration.uuid)
        )
        keep = current.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)
        if current.status != status and not (keep and status == MigrationStatus.ERROR):
            current.status = status
            await self.calls.call("settle migration", current.save)
        return Settlement(outcome, current.status, owner)

    async def move_instance(
        self, ctxt: RequestContext, instance: Instance, host: str, node: str
    ) -> None:
        """The instance now lives on ``host`` (CAS on ``migrating``; idempotent)."""
        if instance.host == host and instance.task_state is None:
            return
        instance.host = host
        instance.node = node
        instance.task_state = None
        instance.vm_state = VMState.ACTIVE
        instance.power_state = PowerState.RUNNING
        instance.progress = 100
        try:
            await self.calls.save(ctxt, "move instance", instance, [TaskState.MIGRATING])
        except exception.UnexpectedTaskStateError:
            current = await self.calls.call(
                "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
            )
            if current.host != host:
                raise
            log.info("instance_already_moved", instance_uuid=instance.uuid, host=host)

    async def move_instance_here(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> None:
        await self.move_instance(ctxt, instance, self.host, self.tracker.nodename)

    async def apply_local(self, instance: Instance, steps: list[str], owner: str | None) -> None:
        """Run this host's driver steps in order, then hold a claim iff the guest lives here."""
        actions = {
            "rollback_live_migration_at_destination": (
                self.driver.rollback_live_migration_at_destination
            ),
            "post_live_migration_at_destination": self.driver.post_live_migration_at_destination,
            "post_live_migration": self.driver.post_live_migration,
            "rollback_live_migration_at_source": self.driver.rollback_live_migration_at_source,
        }
        unknown = [step for step in steps if step not in PEER_STEPS]
        if unknown:
            # Checked before running any: a bad request changes nothing.
            raise exception.InvalidRequest(reason=f"unknown live-migration step(s) {unknown!r}")
        for step in steps:
            await actions[step](instance)
            log.info("settle_step_done", instance_uuid=instance.uuid, step=step, host=self.host)
        if self.tracker.node is None:
            return  # at start, before the tracker: claims are computed from the outcome after
        if owner == self.host:
            try:
                await self.tracker.claim(instance)
            except ClaimRefused:
                log.error("claim_over_capacity_for_present_guest", instance_uuid=instance.uuid)
        else:
            self.tracker.release(instance.uuid)

    # --- retries --------------------------------------------------------------------------

    def retry_later(self, instance_uuid: str, migration_uuid: str, role: Role) -> None:
        self._pending[instance_uuid] = (migration_uuid, role)
        if self._retrying and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = asyncio.create_task(self._retry_loop(), name="settle-retry")

    def start_retrying(self) -> None:
        """Retry what is pending (after the agent started serving)."""
        self._retrying = True
        if self._pending and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = asyncio.create_task(self._retry_loop(), name="settle-retry")

    @property
    def pending(self) -> dict[str, tuple[str, Role]]:
        return dict(self._pending)

    async def stop(self) -> None:
        self._retrying = False
        if self._retry_task is not None:
            self._retry_task.cancel()
            await asyncio.gather(self._retry_task, return_exceptions=True)
            self._retry_task = None

    async def _retry_loop(self) -> None:
        ctxt = admin_context(releases.BINARY_COMPUTE)
        while self._pending:
            await asyncio.sleep(self.settings.settle_retry_interval)
            for instance_uuid, (migration_uuid, role) in list(self._pending.items()):
                try:
                    done = await self.settle(
                        ctxt, instance_uuid, migration_uuid, role, reason="settled on retry"
                    )
                except (exception.FleetException, MessagingError, VirtError):
                    log.exception("settle_retry_failed", instance_uuid=instance_uuid)
                    continue
                if done is not None and self._pending.get(instance_uuid) == (migration_uuid, role):
                    del self._pending[instance_uuid]
