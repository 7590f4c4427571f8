"""``FakeDriver``: an in-process hypervisor honest enough to exercise the whole compute agent.

It models capacity, spawn time, power states, volumes, per-guest firewall rules, a pre-copy live
migration (``migration_model``), failure injection at every step (``failures``) and keeps its
state in a per-host JSON file (``state_store``) so a SIGKILLed agent finds its guests again.
It starts no background work: an idle driver costs nothing. docs/virt.md has the full contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from compute_agent.virt._checks import (
    attach_needed,
    check_detach,
    transition_needed,
    volumes_from_bdi,
)
from compute_agent.virt._guest import GuestRecord
from compute_agent.virt.driver import BlockDeviceInfo
from compute_agent.virt.exceptions import (
    InstanceExists,
    InstanceNotFound,
)
from compute_agent.virt.fake_live_migration import FakeLiveMigration
from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.models import GuestPhase, HasUUID, InstanceInfo, InstanceLike

LOG = structlog.get_logger(__name__)


class FakeDriver(FakeLiveMigration):
    """A simulated hypervisor for one host. See the module docstring and docs/virt.md."""

    async def list_instance_uuids(self) -> list[str]:
        return list(self._guests)

    async def list_guests(self) -> list[InstanceInfo]:
        return [g.info() for g in self._guests.values()]

    async def instance_exists(self, uuid: str) -> bool:
        return uuid in self._guests

    async def get_info(self, uuid: str) -> InstanceInfo:
        return self._get(uuid).info()

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
        volumes = volumes_from_bdi(uuid, block_device_info)
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
        if not transition_needed(guest, GuestPhase.STOPPED, GuestPhase.RUNNING, "power off"):
            return
        guest.set_phase(GuestPhase.STOPPED)
        await self._save()

    async def power_on(self, instance: HasUUID) -> None:
        await self.failures.check("power_on", instance.uuid)
        guest = self._get(instance.uuid)
        if not transition_needed(guest, GuestPhase.RUNNING, GuestPhase.STOPPED, "power on"):
            return
        guest.set_phase(GuestPhase.RUNNING)
        await self._save()

    async def attach_volume(self, instance: HasUUID, volume_id: str, mountpoint: str) -> None:
        await self.failures.check("attach_volume", instance.uuid)
        guest = self._get(instance.uuid)
        if not attach_needed(guest, volume_id, mountpoint):
            return
        self._check_volumes_free(guest.uuid, {volume_id: mountpoint})
        guest.volumes[volume_id] = mountpoint
        await self._save()

    async def detach_volume(self, instance: HasUUID, volume_id: str) -> None:
        await self.failures.check("detach_volume", instance.uuid)
        guest = self._get(instance.uuid)
        check_detach(guest, volume_id)
        del guest.volumes[volume_id]
        await self._save()

    async def get_volumes(self, uuid: str) -> dict[str, str]:
        return dict(self._get(uuid).volumes)

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

    @property
    def state_file_writes(self) -> int:
        """How many times the state file was written (0 without a state dir)."""
        return 0 if self._store is None else self._store.writes
