"""The QEMU driver's guest lifecycle: spawn (boot to the init's first heartbeat), power off and
on, destroy, and what QEMU says of a guest (``query-status``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from compute_agent.virt._checks import transition_needed, volumes_from_bdi
from compute_agent.virt.driver import BlockDeviceInfo
from compute_agent.virt.exceptions import (
    InstanceExists,
    InstanceNotFound,
    VolumeError,
)
from compute_agent.virt.firewall import normalize_rules
from compute_agent.virt.models import GuestPhase, HasUUID, InstanceInfo, InstanceLike, PowerState
from compute_agent.virt.qemu.cmdline import QEMU_LOG, SERIAL_LOG
from compute_agent.virt.qemu.errors import QemuError, QMPError
from compute_agent.virt.qemu.guest import QemuGuest
from compute_agent.virt.qemu.host import QemuHost, read_from, tail
from compute_agent.virt.qemu.initramfs import HEARTBEAT

LOG = structlog.get_logger(__name__)

#: query-status "status" values of a guest that is not executing but still exists.
_PAUSED_STATUSES = frozenset(
    {
        "paused",
        "suspended",
        "prelaunch",
        "inmigrate",
        "postmigrate",
        "finish-migrate",
        "restore-vm",
        "save-vm",
        "debug",
        "colo",
        "watchdog",
    }
)
_DEAD_STATUSES = frozenset({"shutdown", "internal-error", "guest-panicked", "io-error"})


class QemuLifecycle(QemuHost):
    """Spawn, power, destroy and the inventory of the QEMU driver."""

    async def list_instance_uuids(self) -> list[str]:
        return list(self._guests)

    async def list_guests(self) -> list[InstanceInfo]:
        return [await self.get_info(uuid) for uuid in list(self._guests)]

    async def instance_exists(self, uuid: str) -> bool:
        return uuid in self._guests

    async def get_info(self, uuid: str) -> InstanceInfo:
        guest = self._get(uuid)
        if guest.phase is not GuestPhase.RUNNING:
            return guest.info()
        return guest.info(await self._power_state(uuid))

    async def _power_state(self, uuid: str) -> PowerState:
        """What QEMU says (``query-status``); SHUTDOWN if its process is gone."""
        client = self._qmp.get(uuid)
        if client is None or client.closed:
            return PowerState.SHUTDOWN
        try:
            status = await client.execute("query-status", timeout=self.config.qmp_timeout_s)
        except QMPError:
            return PowerState.SHUTDOWN
        name = str(status.get("status"))
        if name == "running":
            return PowerState.RUNNING
        if name in _PAUSED_STATUSES:
            return PowerState.PAUSED
        return PowerState.CRASHED if name in _DEAD_STATUSES else PowerState.NOSTATE

    async def qmp(self, uuid: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on a guest's QEMU (tests and tools: e.g. ``stop``/``cont``)."""
        client = self._qmp.get(uuid)
        if client is None:
            raise QemuError(uuid=uuid, reason="no QEMU process for this guest")
        async with self._qmp_errors(uuid, command):
            return await client.execute(command, arguments, timeout=self.config.qmp_timeout_s)

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
        self.images.get(image_ref)  # ImageNotFound before anything is reserved
        volumes = volumes_from_bdi(uuid, block_device_info)
        self._check_volumes_free(uuid, volumes)
        self._check_capacity(instance)
        guest = QemuGuest(
            uuid=uuid,
            vcpus=instance.vcpus,
            memory_mb=instance.memory_mb,
            root_gb=instance.root_gb,
            phase=GuestPhase.SPAWNING,
            image_ref=image_ref,
            volumes=volumes,
            ports={vid: i for i, vid in enumerate(volumes, start=1)},
            rules=rules,
        )
        if len(guest.ports) > self.config.hotplug_slots:
            raise VolumeError(f"{len(volumes)} volumes but only {self.config.hotplug_slots} slots")
        # Reserved at once (no await since the checks): concurrent spawns never over-commit.
        self._guests[uuid] = guest
        try:
            await asyncio.to_thread(self.guest_dir(uuid).mkdir, parents=True, exist_ok=True)
            await self._save(guest)
            async with self._lock(uuid):
                await self._boot(guest)
                if self._guests.get(uuid) is not guest:
                    raise InstanceNotFound(
                        f"instance {uuid} was destroyed while spawning", uuid=uuid
                    )
                guest.phase = GuestPhase.RUNNING
                await self._save(guest)
        except BaseException:
            # No guest is left behind after a failed build: no process, no directory.
            if self._guests.get(uuid) is guest:
                del self._guests[uuid]
                await self._remove(uuid)
            raise
        LOG.info("qemu_spawned", uuid=uuid, host=self.host, accel=guest.accel)

    async def _boot(self, guest: QemuGuest) -> None:
        """Start QEMU with the guest's disks and wait for the init's first heartbeat."""
        accel = "tcg" if self._kvm_broken else self.config.accel
        guest.accel = None
        try:
            await self._boot_with(guest, accel)
        except QemuError as exc:
            if accel != "kvm:tcg" or guest.accel == "tcg":
                raise  # TCG already ran it: falling back would not change anything
            # KVM was there but could not run the guest (e.g. a nested /dev/kvm aborting on
            # an MSR, before or after QEMU daemonized): emulate, now and for later guests.
            LOG.warning("qemu_kvm_unusable_falling_back_to_tcg", uuid=guest.uuid, error=str(exc))
            self._kvm_broken = True
            await self._stop_process(guest.uuid)
            await self._boot_with(guest, "tcg")

    async def _boot_with(self, guest: QemuGuest, accel: str) -> None:
        started = time.monotonic()
        await self._start_qemu(guest, accel)
        await self._wait_heartbeat(guest, self.guest_dir(guest.uuid) / SERIAL_LOG)
        LOG.info(
            "qemu_guest_booted",
            uuid=guest.uuid,
            accel=guest.accel,
            seconds=round(time.monotonic() - started, 2),
        )

    async def _wait_heartbeat(self, guest: QemuGuest, serial: Path) -> None:
        deadline = time.monotonic() + self.config.boot_timeout_s
        offset = 0
        seen = b""
        while True:
            chunk = await asyncio.to_thread(read_from, serial, offset)
            offset += len(chunk)
            seen = (seen + chunk)[-4096:]
            if HEARTBEAT.encode() in seen:
                return
            client = self._qmp.get(guest.uuid)
            if client is None or client.closed:
                raise QemuError(
                    uuid=guest.uuid,
                    reason=f"QEMU ended before the guest's init ran: {tail(serial)}"
                    f" {tail(self.guest_dir(guest.uuid) / QEMU_LOG)}",
                )
            if time.monotonic() >= deadline:
                raise QemuError(
                    uuid=guest.uuid,
                    reason=f"no heartbeat within {self.config.boot_timeout_s} s: {tail(serial)}",
                )
            await asyncio.sleep(0.1)

    async def destroy(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        if uuid not in self._guests:
            return
        job = self._jobs.get(uuid)
        if job is not None and not (job.switching or job.forced):
            job.abort_requested, job.abort_reason = True, "guest destroyed"
            await job.finished.wait()
        async with self._lock(uuid):
            if self._guests.pop(uuid, None) is not None:
                await self._remove(uuid)
        self._locks.pop(uuid, None)
        LOG.info("qemu_destroyed", uuid=uuid, host=self.host)

    async def power_off(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if not transition_needed(guest, GuestPhase.STOPPED, GuestPhase.RUNNING, "power off"):
                return
            # The busybox guest has no ACPI daemon: powering off ends its QEMU; the record stays.
            await self._stop_process(guest.uuid)
            guest.phase = GuestPhase.STOPPED
            await self._save(guest)

    async def power_on(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if not transition_needed(guest, GuestPhase.RUNNING, GuestPhase.STOPPED, "power on"):
                return
            try:
                await self._boot(guest)
            except BaseException:
                await self._stop_process(guest.uuid)
                raise
            guest.phase = GuestPhase.RUNNING
            await self._save(guest)
