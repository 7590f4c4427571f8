"""The fake hypervisor's pre-copy live migration (``migration_model``): the checks, the paused
incoming guest, the memory copy with its abort and force-complete, and what follows the copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

import structlog

from compute_agent.virt._checks import removal_needed, require_phase, transition_needed
from compute_agent.virt._guest import GuestRecord
from compute_agent.virt._migration_data import (
    bandwidth_limit,
    check_destination,
    check_source,
    destination_data,
    incoming_prepared,
    incoming_volumes,
    source_data,
)
from compute_agent.virt._progress import ProgressReporter
from compute_agent.virt.driver import ProgressCallback
from compute_agent.virt.exceptions import (
    MigrationAborted,
    MigrationNotConverging,
    NoActiveMigration,
)
from compute_agent.virt.fake_state import FakeDriverState, _CopyJob
from compute_agent.virt.firewall import normalize_rules
from compute_agent.virt.migration_model import CopyState, NonConvergencePolicy
from compute_agent.virt.models import GuestPhase, HasUUID, InstanceLike, MigrationResult

LOG = structlog.get_logger(__name__)


class FakeLiveMigration(FakeDriverState):
    """The fake hypervisor's pre-copy live migration: checks, preparation, copy, what follows."""

    async def check_can_live_migrate_destination(
        self, instance: InstanceLike, source_host: str | None = None
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        await self.failures.check("check_can_live_migrate_destination", uuid)
        check_destination(host, uuid, source_host, self._guests.get(uuid))
        self._check_capacity(instance)
        return destination_data(host, source_host, await self.get_available_resource())

    async def check_can_live_migrate_source(
        self, instance: InstanceLike, dest_check_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        await self.failures.check("check_can_live_migrate_source", instance.uuid)
        guest = self._get(instance.uuid)
        check_source(host, guest, dest_check_data)
        return source_data(host, guest, dest_check_data)

    async def pre_live_migration(
        self, instance: InstanceLike, migrate_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        await self.failures.check("pre_live_migration", uuid)
        source = migrate_data.get("source_host")
        volumes = incoming_volumes(migrate_data)
        result = {"dest_host": host, "volumes": volumes}
        if incoming_prepared(self._guests.get(uuid), uuid, source):
            return result
        rules = normalize_rules(migrate_data.get("firewall_rules") or [])
        self._check_volumes_free(uuid, volumes)
        self._check_capacity(instance)
        self._guests[uuid] = GuestRecord(
            uuid=uuid,
            vcpus=instance.vcpus,
            memory_mb=instance.memory_mb,
            root_gb=instance.root_gb,
            phase=GuestPhase.INCOMING,
            image_ref=migrate_data.get("image_ref"),
            volumes=volumes,
            rules=rules,
            migration_peer=None if source is None else str(source),
        )
        await self._save()
        return result

    async def live_migration(
        self,
        instance: InstanceLike,
        dest: str,
        migrate_data: Mapping[str, Any],
        progress_cb: ProgressCallback | None = None,
    ) -> MigrationResult:
        self._require_host()
        uuid = instance.uuid
        await self.failures.check("live_migration", uuid)
        guest = self._get(uuid)
        require_phase(guest, GuestPhase.RUNNING, "live-migrate")
        job = _CopyJob(dest=dest)
        self._jobs[uuid] = job
        guest.set_phase(GuestPhase.MIGRATING_OUT, peer=dest)
        reporter = ProgressReporter(progress_cb, self.config.migration.progress_interval_s, uuid)
        try:
            await self._save()
            result = await self._copy(guest, job, reporter, bandwidth_limit(migrate_data))
        except BaseException:
            if not job.switching and self._guests.get(uuid) is guest:
                # Nothing was switched: the guest keeps running here, as if never touched.
                guest.set_phase(GuestPhase.RUNNING)
                await self._save()
            raise
        finally:
            self._jobs.pop(uuid, None)
            job.finished.set()
            await reporter.close()
        LOG.info(
            "fake_live_migration_done",
            uuid=uuid,
            dest=dest,
            rounds=result.rounds,
            forced=result.forced,
        )
        return result

    async def _copy(
        self,
        guest: GuestRecord,
        job: _CopyJob,
        reporter: ProgressReporter,
        bandwidth_limit_mb_s: float | None = None,
    ) -> MigrationResult:
        model = self.config.migration
        if bandwidth_limit_mb_s is not None and bandwidth_limit_mb_s < model.bandwidth_mb_s:
            # The operator's cap for this migration (LiveMigrateData.bandwidth_limit_mb_s).
            model = dataclasses.replace(model, bandwidth_mb_s=float(bandwidth_limit_mb_s))
        uuid = guest.uuid
        state = CopyState.start(guest.memory_mb)
        sleep_s = model.real_round_sleep_s
        while True:
            self._check_copy_alive(guest, job, state)
            await self.failures.check("live_migration_copy", uuid, round_index=state.rounds)
            self._check_copy_alive(guest, job, state)
            state.paused = job.force_requested
            state.step(model, guest.dirty_rate_mb_s)
            reporter.report(state, job.force_requested)
            if state.converged(model):
                break
            if not job.force_requested and state.out_of_budget(model):
                if model.policy is NonConvergencePolicy.FORCE:
                    job.force_requested = True
                else:
                    raise MigrationNotConverging(
                        uuid=uuid, rounds=state.rounds, remaining=state.memory_remaining
                    )
            await asyncio.sleep(sleep_s)
        # Last chance for an abort: from here on the switch-over cannot be stopped.
        self._check_copy_alive(guest, job, state)
        job.switching = True
        downtime = state.finish(model)
        guest.set_phase(GuestPhase.MIGRATED_OUT, peer=job.dest)
        await self._save()
        reporter.report(state, job.force_requested, final=True)
        return MigrationResult(
            rounds=state.rounds,
            memory_total=state.memory_total,
            memory_processed=state.memory_processed,
            downtime_s=downtime,
            duration_s=state.simulated_s,
            forced=job.force_requested,
        )

    def _check_copy_alive(self, guest: GuestRecord, job: _CopyJob, state: CopyState) -> None:
        if job.abort_requested or self._guests.get(guest.uuid) is not guest:
            reason = job.abort_reason if job.abort_requested else "guest destroyed"
            raise MigrationAborted(
                f"live migration of {guest.uuid} aborted after {state.rounds} rounds: {reason}",
                uuid=guest.uuid,
                rounds=state.rounds,
            )

    async def live_migration_abort(self, uuid: str) -> None:
        job = self._jobs.get(uuid)
        if job is None or job.switching:
            raise NoActiveMigration(uuid=uuid)
        job.abort_requested = True
        # Once the copy has stopped the guest is RUNNING here again; callers can rely on it.
        await job.finished.wait()

    async def live_migration_force_complete(self, uuid: str) -> None:
        job = self._jobs.get(uuid)
        if job is None or job.switching:
            raise NoActiveMigration(uuid=uuid)
        job.force_requested = True

    async def post_live_migration(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        await self.failures.check("post_live_migration", uuid)
        guest = self._guests.get(uuid)
        if not removal_needed(guest, GuestPhase.MIGRATED_OUT, "clean up after migration"):
            return
        del self._guests[uuid]
        await self._save()

    async def post_live_migration_at_destination(self, instance: HasUUID) -> None:
        await self.failures.check("post_live_migration_at_destination", instance.uuid)
        guest = self._get(instance.uuid)
        action = "finish incoming migration"
        if not transition_needed(guest, GuestPhase.RUNNING, GuestPhase.INCOMING, action):
            return
        guest.set_phase(GuestPhase.RUNNING)
        await self._save()

    async def rollback_live_migration_at_destination(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        await self.failures.check("rollback_live_migration_at_destination", uuid)
        guest = self._guests.get(uuid)
        if not removal_needed(guest, GuestPhase.INCOMING, "roll back incoming migration"):
            return
        del self._guests[uuid]
        await self._save()

    async def rollback_live_migration_at_source(self, instance: HasUUID) -> None:
        await self.failures.check("rollback_live_migration_at_source", instance.uuid)
        guest = self._get(instance.uuid)
        action = "resume after migration"
        if not transition_needed(guest, GuestPhase.RUNNING, GuestPhase.MIGRATED_OUT, action):
            return
        guest.set_phase(GuestPhase.RUNNING)
        await self._save()

    async def set_dirty_rate(self, uuid: str, dirty_rate_mb_s: float | None) -> None:
        """Make one guest dirty memory at its own rate (None: the model's); applies mid-copy."""
        guest = self._get(uuid)
        if dirty_rate_mb_s is not None and dirty_rate_mb_s < 0:
            raise ValueError("dirty rate must be >= 0")
        guest.dirty_rate_mb_s = dirty_rate_mb_s
        await self._save()
