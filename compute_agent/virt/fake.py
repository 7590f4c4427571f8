"""``FakeDriver``: an in-process hypervisor honest enough to exercise the whole compute agent.

It models capacity, spawn time, power states, volumes, per-guest firewall rules, a pre-copy live
migration (``migration_model``), failure injection at every step (``failures``) and keeps its
state in a per-host JSON file (``state_store``) so a SIGKILLed agent finds its guests again.
It starts no background work: an idle driver costs nothing. docs/virt.md has the full contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from compute_agent.virt._guest import GuestRecord
from compute_agent.virt._progress import ProgressReporter
from compute_agent.virt.capacity import check_capacity, check_volumes_free
from compute_agent.virt.driver import BlockDeviceInfo, ComputeDriver, ProgressCallback
from compute_agent.virt.exceptions import (
    InstanceExists,
    InstanceNotFound,
    InvalidGuestState,
    MigrationAborted,
    MigrationNotConverging,
    MigrationPreCheckError,
    NoActiveMigration,
    StateFileError,
    VolumeAlreadyAttached,
    VolumeNotAttached,
)
from compute_agent.virt.failures import FailureInjector
from compute_agent.virt.fake_config import FakeDriverConfig
from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.migration_model import CopyState, NonConvergencePolicy
from compute_agent.virt.models import (
    GuestPhase,
    HasUUID,
    HostResources,
    InstanceInfo,
    InstanceLike,
    MigrationResult,
)
from compute_agent.virt.state_store import StateStore

LOG = structlog.get_logger(__name__)

#: Phases in which volumes may be attached, or detached (never while a migration holds the guest).
_ATTACH_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.STOPPED})
_DETACH_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.STOPPED, GuestPhase.ERROR})
#: Phases counted as running VMs.
_RUNNING_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.MIGRATING_OUT})


@dataclass
class _CopyJob:
    """Control block of one running memory copy (source side)."""

    dest: str
    abort_requested: bool = False
    abort_reason: str = "aborted"
    force_requested: bool = False
    switching: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class FakeDriver(ComputeDriver):
    """A simulated hypervisor for one host. See the module docstring and docs/virt.md."""

    def __init__(self, config: FakeDriverConfig | None = None) -> None:
        self.config = config or FakeDriverConfig()
        self.failures = FailureInjector()
        if self.config.failures:
            self.failures.load_spec(self.config.failures)
        self.failures.watch_file(self.config.failures_file)
        self.host: str | None = None
        self._guests: dict[str, GuestRecord] = {}
        self._jobs: dict[str, _CopyJob] = {}
        self._store: StateStore | None = None

    # --- host -----------------------------------------------------------------------------

    async def init_host(self, host: str) -> None:
        if self.host is not None:
            raise RuntimeError(f"FakeDriver already initialised for host {self.host}")
        await self.failures.check("init_host", None)
        self.host = host
        if self.config.state_dir is None:
            return
        self._store = StateStore(
            self.config.state_dir / f"{host}.json", self._snapshot, fsync=self.config.fsync
        )
        try:
            await self._load(self._store)
        except BaseException:
            # Leave the driver as it was, so init_host can be retried once the cause is fixed.
            self.host, self._store, self._guests = None, None, {}
            raise
        LOG.info("fake_hypervisor_loaded", host=host, guests=len(self._guests))

    async def _load(self, store: StateStore) -> None:
        document = await store.load()
        if document is not None:
            if document.get("host") != self.host:
                raise StateFileError(path=str(store.path), reason="state of another host")
            try:
                guests = [
                    GuestRecord.from_json(g) for g in dict(document.get("guests") or {}).values()
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise StateFileError(path=str(store.path), reason=repr(exc)) from exc
            for guest in guests:
                self._recover(guest)
                self._guests[guest.uuid] = guest
        await self._save()

    @staticmethod
    def _recover(guest: GuestRecord) -> None:
        """What the agent's death did to a guest (the process that ran it died with it)."""
        if guest.phase is GuestPhase.SPAWNING:
            # The build never finished: the guest never ran and must be destroyed.
            guest.set_phase(GuestPhase.ERROR)
            guest.interrupted = "spawn"
        elif guest.phase is GuestPhase.MIGRATING_OUT:
            # The copy loop died before the switch-over: the guest never stopped running here.
            peer = guest.migration_peer
            guest.set_phase(GuestPhase.RUNNING)
            guest.interrupted = "live_migration_copy"
            LOG.info("fake_migration_interrupted", uuid=guest.uuid, dest=peer)

    async def cleanup_host(self) -> None:
        for job in list(self._jobs.values()):
            if not job.switching:
                job.abort_requested = True
                job.abort_reason = "host shutdown"
        for job in list(self._jobs.values()):
            await job.finished.wait()
        if self._store is not None:
            await self._store.flush()

    async def get_available_resource(self) -> HostResources:
        host = self._require_host()
        guests = list(self._guests.values())
        return HostResources(
            hypervisor_hostname=self.config.hypervisor_hostname or host,
            vcpus=self.config.vcpus,
            memory_mb=self.config.memory_mb,
            local_gb=self.config.local_gb,
            vcpus_used=sum(g.vcpus for g in guests),
            memory_mb_used=sum(g.memory_mb for g in guests),
            local_gb_used=sum(g.root_gb for g in guests),
            running_vms=sum(1 for g in guests if g.phase in _RUNNING_PHASES),
        )

    # --- inventory ------------------------------------------------------------------------

    async def list_instance_uuids(self) -> list[str]:
        return list(self._guests)

    async def list_guests(self) -> list[InstanceInfo]:
        return [g.info() for g in self._guests.values()]

    async def instance_exists(self, uuid: str) -> bool:
        return uuid in self._guests

    async def get_info(self, uuid: str) -> InstanceInfo:
        return self._get(uuid).info()

    # --- lifecycle ------------------------------------------------------------------------

    async def spawn(
        self,
        instance: InstanceLike,
        image_ref: str,
        block_device_info: BlockDeviceInfo | None = None,
        security_rules: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        self._require_host()
        uuid = instance.uuid
        if uuid in self._guests:
            raise InstanceExists(uuid=uuid)
        rules = normalize_rules(security_rules or [])
        volumes = _volumes_from_bdi(uuid, block_device_info)
        self._check_volumes_free(uuid, volumes)
        self._check_capacity(instance)
        guest = GuestRecord(
            uuid=uuid,
            vcpus=instance.vcpus,
            memory_mb=instance.memory_mb,
            root_gb=instance.root_gb,
            phase=GuestPhase.SPAWNING,
            image_ref=image_ref,
            volumes=volumes,
            rules=rules,
        )
        # Reserve at once (no await since the check) so concurrent spawns never over-commit.
        self._guests[uuid] = guest
        try:
            await self._save()
            await self.failures.check("spawn", uuid)
            if self.config.spawn_delay_s:
                await asyncio.sleep(self.config.spawn_delay_s)
            if self._guests.get(uuid) is not guest:
                raise InstanceNotFound(f"instance {uuid} was destroyed while spawning", uuid=uuid)
            guest.set_phase(GuestPhase.RUNNING)
            await self._save()
        except BaseException:
            # The driver cleans up its own partial build: no guest is left after a failure.
            if self._guests.get(uuid) is guest and guest.phase is GuestPhase.SPAWNING:
                del self._guests[uuid]
                await self._save()
            raise
        LOG.debug("fake_spawned", uuid=uuid, host=self.host)

    async def destroy(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        await self.failures.check("destroy", uuid)
        job = self._jobs.get(uuid)
        if job is not None and not job.switching:
            job.abort_requested = True
            job.abort_reason = "guest destroyed"
        if self._guests.pop(uuid, None) is not None:
            await self._save()

    async def power_off(self, instance: HasUUID) -> None:
        await self.failures.check("power_off", instance.uuid)
        guest = self._get(instance.uuid)
        if guest.phase is GuestPhase.STOPPED:
            return
        if guest.phase is not GuestPhase.RUNNING:
            raise InvalidGuestState(uuid=guest.uuid, phase=guest.phase.value, action="power off")
        guest.set_phase(GuestPhase.STOPPED)
        await self._save()

    async def power_on(self, instance: HasUUID) -> None:
        await self.failures.check("power_on", instance.uuid)
        guest = self._get(instance.uuid)
        if guest.phase is GuestPhase.RUNNING:
            return
        if guest.phase is not GuestPhase.STOPPED:
            raise InvalidGuestState(uuid=guest.uuid, phase=guest.phase.value, action="power on")
        guest.set_phase(GuestPhase.RUNNING)
        await self._save()

    # --- volumes --------------------------------------------------------------------------

    async def attach_volume(self, instance: HasUUID, volume_id: str, mountpoint: str) -> None:
        await self.failures.check("attach_volume", instance.uuid)
        guest = self._get(instance.uuid)
        if guest.volumes.get(volume_id) == mountpoint:
            return  # a redelivered request: already done
        if guest.phase not in _ATTACH_PHASES:
            raise InvalidGuestState(
                uuid=guest.uuid, phase=guest.phase.value, action="attach a volume"
            )
        self._check_volumes_free(guest.uuid, {volume_id: mountpoint})
        guest.volumes[volume_id] = mountpoint
        await self._save()

    async def detach_volume(self, instance: HasUUID, volume_id: str) -> None:
        await self.failures.check("detach_volume", instance.uuid)
        guest = self._get(instance.uuid)
        if volume_id not in guest.volumes:
            raise VolumeNotAttached(uuid=guest.uuid, volume_id=volume_id)
        if guest.phase not in _DETACH_PHASES:
            raise InvalidGuestState(
                uuid=guest.uuid, phase=guest.phase.value, action="detach a volume"
            )
        del guest.volumes[volume_id]
        await self._save()

    async def get_volumes(self, uuid: str) -> dict[str, str]:
        return dict(self._get(uuid).volumes)

    # --- firewall -------------------------------------------------------------------------

    async def refresh_instance_security_rules(
        self, instance: HasUUID, rules: Sequence[Mapping[str, Any]]
    ) -> None:
        normalized = normalize_rules(rules)
        await self.failures.check("refresh_instance_security_rules", instance.uuid)
        guest = self._get(instance.uuid)
        if normalized == guest.rules:
            return
        guest.rules = normalized
        await self._save()

    async def get_firewall_rules(self, uuid: str) -> list[FirewallRule]:
        return [dict(r) for r in self._get(uuid).rules]

    async def unfilter_instance(self, instance: HasUUID) -> None:
        await self.failures.check("unfilter_instance", instance.uuid)
        guest = self._guests.get(instance.uuid)
        if guest is not None and guest.rules:
            guest.rules = []
            await self._save()

    # --- live migration: checks and preparation -------------------------------------------

    async def check_can_live_migrate_destination(
        self, instance: InstanceLike, source_host: str | None = None
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        await self.failures.check("check_can_live_migrate_destination", uuid)
        if source_host == host:
            raise MigrationPreCheckError(uuid=uuid, reason=f"destination {host} is the source")
        existing = self._guests.get(uuid)
        if existing is not None:
            raise MigrationPreCheckError(
                uuid=uuid, reason=f"guest already on {host} ({existing.phase.value})"
            )
        self._check_capacity(instance)
        resources = await self.get_available_resource()
        return {
            "dest_host": host,
            "dest_hypervisor_hostname": resources.hypervisor_hostname,
            "dest_memory_mb_free": resources.memory_mb_free,
            "dest_local_gb_free": resources.local_gb_free,
            "source_host": source_host,
        }

    async def check_can_live_migrate_source(
        self, instance: InstanceLike, dest_check_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        await self.failures.check("check_can_live_migrate_source", instance.uuid)
        guest = self._get(instance.uuid)
        if guest.phase is not GuestPhase.RUNNING:
            raise MigrationPreCheckError(
                uuid=guest.uuid, reason=f"guest is {guest.phase.value}, not running"
            )
        if dest_check_data.get("dest_host") == host:
            raise MigrationPreCheckError(uuid=guest.uuid, reason="destination is this host")
        migrate_data = dict(dest_check_data)
        migrate_data.update(
            {
                "source_host": host,
                "instance_uuid": guest.uuid,
                "vcpus": guest.vcpus,
                "memory_mb": guest.memory_mb,
                "root_gb": guest.root_gb,
                "image_ref": guest.image_ref,
                "volumes": dict(guest.volumes),
                "firewall_rules": [dict(r) for r in guest.rules],
            }
        )
        return migrate_data

    async def pre_live_migration(
        self, instance: InstanceLike, migrate_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        await self.failures.check("pre_live_migration", uuid)
        source = migrate_data.get("source_host")
        volumes = {str(k): str(v) for k, v in dict(migrate_data.get("volumes") or {}).items()}
        result = {"dest_host": host, "volumes": volumes}
        existing = self._guests.get(uuid)
        if existing is not None:
            if existing.phase is GuestPhase.INCOMING and existing.migration_peer == source:
                return result  # a redelivered request: already prepared
            raise InstanceExists(uuid=uuid)
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

    # --- live migration: the copy -----------------------------------------------------------

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
        if guest.phase is not GuestPhase.RUNNING:
            raise InvalidGuestState(uuid=uuid, phase=guest.phase.value, action="live-migrate")
        job = _CopyJob(dest=dest)
        self._jobs[uuid] = job
        guest.set_phase(GuestPhase.MIGRATING_OUT, peer=dest)
        reporter = ProgressReporter(progress_cb, self.config.migration.progress_interval_s, uuid)
        try:
            await self._save()
            result = await self._copy(guest, job, reporter, _bandwidth_limit(migrate_data))
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

    # --- live migration: after the copy ---------------------------------------------------

    async def post_live_migration(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        await self.failures.check("post_live_migration", uuid)
        guest = self._guests.get(uuid)
        if guest is None:
            return
        if guest.phase is not GuestPhase.MIGRATED_OUT:
            raise InvalidGuestState(
                uuid=uuid, phase=guest.phase.value, action="clean up after migration"
            )
        del self._guests[uuid]
        await self._save()

    async def post_live_migration_at_destination(self, instance: HasUUID) -> None:
        await self.failures.check("post_live_migration_at_destination", instance.uuid)
        guest = self._get(instance.uuid)
        if guest.phase is GuestPhase.RUNNING:
            return
        if guest.phase is not GuestPhase.INCOMING:
            raise InvalidGuestState(
                uuid=guest.uuid, phase=guest.phase.value, action="finish incoming migration"
            )
        guest.set_phase(GuestPhase.RUNNING)
        await self._save()

    async def rollback_live_migration_at_destination(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        await self.failures.check("rollback_live_migration_at_destination", uuid)
        guest = self._guests.get(uuid)
        if guest is None:
            return
        if guest.phase is not GuestPhase.INCOMING:
            raise InvalidGuestState(
                uuid=uuid, phase=guest.phase.value, action="roll back incoming migration"
            )
        del self._guests[uuid]
        await self._save()

    async def rollback_live_migration_at_source(self, instance: HasUUID) -> None:
        await self.failures.check("rollback_live_migration_at_source", instance.uuid)
        guest = self._get(instance.uuid)
        if guest.phase is GuestPhase.RUNNING:
            return
        if guest.phase is not GuestPhase.MIGRATED_OUT:
            raise InvalidGuestState(
                uuid=guest.uuid, phase=guest.phase.value, action="resume after migration"
            )
        guest.set_phase(GuestPhase.RUNNING)
        await self._save()

    # --- test hooks -------------------------------------------------------------------------

    async def set_dirty_rate(self, uuid: str, dirty_rate_mb_s: float | None) -> None:
        """Make one guest dirty memory at its own rate (None: the model's); applies mid-copy."""
        guest = self._get(uuid)
        if dirty_rate_mb_s is not None and dirty_rate_mb_s < 0:
            raise ValueError("dirty rate must be >= 0")
        guest.dirty_rate_mb_s = dirty_rate_mb_s
        await self._save()

    @property
    def state_file_writes(self) -> int:
        """How many times the state file was written (0 without a state dir)."""
        return 0 if self._store is None else self._store.writes

    # --- internals --------------------------------------------------------------------------

    def _require_host(self) -> str:
        if self.host is None:
            raise RuntimeError("FakeDriver.init_host() has not been called")
        return self.host

    def _get(self, uuid: str) -> GuestRecord:
        guest = self._guests.get(uuid)
        if guest is None:
            raise InstanceNotFound(uuid=uuid)
        return guest

    def _check_capacity(self, instance: InstanceLike) -> None:
        check_capacity(self._require_host(), self.config, self._guests.values(), instance)

    def _check_volumes_free(self, uuid: str, volumes: Mapping[str, str]) -> None:
        check_volumes_free(self._guests.values(), uuid, volumes)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "hypervisor_hostname": self.config.hypervisor_hostname or self.host,
            "guests": {uuid: g.to_json() for uuid, g in self._guests.items()},
        }

    async def _save(self) -> None:
        if self._store is None:
            return
        self._store.mark_dirty()
        await self._store.flush()


def _volumes_from_bdi(uuid: str, block_device_info: BlockDeviceInfo | None) -> dict[str, str]:
    volumes: dict[str, str] = {}
    for bdm in block_device_info or ():
        volume_id = bdm["volume_id"]
        mountpoint = bdm.get("mountpoint") or bdm.get("device_name") or f"/dev/vd{len(volumes)}"
        if volume_id in volumes or mountpoint in volumes.values():
            raise VolumeAlreadyAttached(uuid=uuid, volume_id=volume_id, mountpoint=mountpoint)
        volumes[volume_id] = mountpoint
    return volumes


def _bandwidth_limit(migrate_data: Mapping[str, Any]) -> float | None:
    """The migration's bandwidth cap in MB/s, when the caller set a valid one."""
    value = migrate_data.get("bandwidth_limit_mb_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None
