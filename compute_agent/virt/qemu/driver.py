"""``QemuDriver``: real guests, one QEMU process each, driven over QMP.

Each guest lives in ``<state_dir>/qemu-<host>/<uuid>/``: ``guest.json`` (the record),
``serial.log`` (its console), ``qmp.sock``, ``qemu.pid``, ``qemu.log``. QEMU daemonizes, so
guests outlive the agent; ``init_host`` re-attaches to their QMP sockets. A guest is RUNNING
(ACTIVE for the agent) only once its init printed its first heartbeat on the serial console.

Volumes are raw files ``<volume_dir>/<volume_id>.img``, hot-plugged as virtio-blk on a free
PCIe root port (``blockdev-add`` + ``device_add``) and unplugged with ``device_del``, waiting
for ``DEVICE_DELETED``, then ``blockdev-del``. Guests have no network (``-nic none``): the
security-group rules are recorded and reported, not enforced. Live migration: the destination
starts QEMU with the same device set and ``-incoming defer``, the source migrates to it over
``tcp:127.0.0.1:<port>`` (``migration.py``). docs/virt.md §9.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from compute_agent.virt._progress import ProgressReporter
from compute_agent.virt.capacity import check_capacity, check_volumes_free
from compute_agent.virt.driver import BlockDeviceInfo, ComputeDriver, ProgressCallback
from compute_agent.virt.exceptions import (
    InstanceExists,
    InstanceNotFound,
    InvalidGuestState,
    MigrationError,
    MigrationPreCheckError,
    NoActiveMigration,
    VolumeAlreadyAttached,
    VolumeError,
    VolumeNotAttached,
)
from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.models import (
    GuestPhase,
    HasUUID,
    HostResources,
    InstanceInfo,
    InstanceLike,
    MigrationResult,
    PowerState,
)
from compute_agent.virt.qemu import migration, process
from compute_agent.virt.qemu.cmdline import (
    QEMU_LOG,
    QMP_SOCKET,
    SERIAL_LOG,
    Disk,
    build_command,
    volume_file_name,
)
from compute_agent.virt.qemu.config import QemuDriverConfig
from compute_agent.virt.qemu.errors import (
    QemuError,
    QMPCommandError,
    QMPError,
    QMPTimeout,
    VolumeDetachTimeout,
)
from compute_agent.virt.qemu.guest import QemuGuest, read_record, write_record
from compute_agent.virt.qemu.image import ImageCatalogue
from compute_agent.virt.qemu.initramfs import HEARTBEAT
from compute_agent.virt.qemu.qmp import QMPClient

LOG = structlog.get_logger(__name__)

_ATTACH_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.STOPPED})
_DETACH_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.STOPPED, GuestPhase.ERROR})
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


class QemuDriver(ComputeDriver):
    """Real guests under QEMU for one host. See the module docstring and docs/virt.md."""

    def __init__(self, config: QemuDriverConfig | None = None) -> None:
        self.config = config or QemuDriverConfig()
        self.images = ImageCatalogue(self.config.image_dir)
        self.host: str | None = None
        self._guests: dict[str, QemuGuest] = {}
        self._qmp: dict[str, QMPClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._jobs: dict[str, migration.CopyJob] = {}
        #: Set once KVM was tried and failed to run a guest: later boots go straight to TCG.
        self._kvm_broken = False

    # --- host -----------------------------------------------------------------------------

    @property
    def host_dir(self) -> Path:
        """The directory of this host's guests."""
        return self.config.state_dir / f"qemu-{self._require_host()}"

    def guest_dir(self, uuid: str) -> Path:
        """The directory of one guest (record, serial log, QMP socket, pid file)."""
        return self.host_dir / uuid

    async def init_host(self, host: str) -> None:
        if self.host is not None:
            raise RuntimeError(f"QemuDriver already initialised for host {self.host}")
        self.host = host
        await asyncio.to_thread(self.host_dir.mkdir, parents=True, exist_ok=True)
        for guest_dir in sorted(await asyncio.to_thread(_subdirs, self.host_dir)):
            await self._adopt(guest_dir)
        LOG.info("qemu_hypervisor_loaded", host=host, guests=len(self._guests))

    async def _adopt(self, guest_dir: Path) -> None:
        """Take over a guest found on disk: re-attach to its QEMU, or note that it is gone."""
        try:
            guest = await asyncio.to_thread(read_record, guest_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            LOG.warning("qemu_guest_record_unreadable", dir=str(guest_dir), error=repr(exc))
            return
        pid = process.guest_pid(guest_dir, guest.uuid)
        if guest.phase is GuestPhase.SPAWNING:
            # The build never finished: like the fake, report it for the agent to destroy.
            guest.phase, guest.interrupted = GuestPhase.ERROR, "spawn"
        elif pid is not None:
            try:
                self._qmp[guest.uuid] = await QMPClient.connect(
                    guest_dir / QMP_SOCKET, timeout=self.config.qmp_timeout_s
                )
            except QMPError as exc:
                LOG.warning("qemu_reattach_failed", uuid=guest.uuid, error=str(exc))
                await process.kill(pid, guest.uuid)
                pid = None
        client = self._qmp.get(guest.uuid)
        if client is not None and guest.phase is GuestPhase.MIGRATING_OUT:
            await self._adopt_interrupted_copy(guest, client)
        if pid is None and guest.phase in (GuestPhase.RUNNING, GuestPhase.MIGRATING_OUT):
            # Its QEMU died while nobody watched: the guest is defined but powered off.
            guest.set_phase(GuestPhase.STOPPED)
        if pid is None and guest.phase is GuestPhase.INCOMING:
            # The destination half died with nothing to resume: the guest is not here.
            await asyncio.to_thread(shutil.rmtree, guest_dir, True)
            LOG.info("qemu_incoming_guest_gone", uuid=guest.uuid)
            return
        self._guests[guest.uuid] = guest
        await self._save(guest)
        LOG.info("qemu_guest_adopted", uuid=guest.uuid, phase=guest.phase.value, pid=pid)

    async def _adopt_interrupted_copy(self, guest: QemuGuest, client: QMPClient) -> None:
        """The agent died during a copy QEMU kept running: finish the story QEMU tells."""
        try:
            info = await client.execute("query-migrate", timeout=self.config.qmp_timeout_s)
        except QMPError:
            info = {}
        if info.get("status") == "completed":
            # The switch-over happened without us: the destination holds the guest.
            guest.set_phase(GuestPhase.MIGRATED_OUT, peer=guest.migration_peer)
            return
        peer = guest.migration_peer
        await self._cancel_copy(guest.uuid, client)
        guest.set_phase(GuestPhase.RUNNING)
        guest.interrupted = "live_migration_copy"
        LOG.info("qemu_migration_interrupted", uuid=guest.uuid, dest=peer)

    async def cleanup_host(self) -> None:
        for job in list(self._jobs.values()):
            if not (job.switching or job.forced):
                job.abort_requested, job.abort_reason = True, "host shutdown"
        for job in list(self._jobs.values()):
            await job.finished.wait()
        # Guests keep running without the agent: only the monitor connections are closed.
        for client in list(self._qmp.values()):
            await client.close()
        self._qmp.clear()

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
            running_vms=sum(1 for g in guests if g.phase is GuestPhase.RUNNING),
            hypervisor_type="qemu",
        )

    # --- inventory ------------------------------------------------------------------------

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
        self.images.get(image_ref)  # ImageNotFound before anything is reserved
        volumes = _volumes_from_bdi(uuid, block_device_info)
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

    async def _start_qemu(self, guest: QemuGuest, accel: str, incoming: bool = False) -> QMPClient:
        """Start the guest's QEMU (daemonized) and connect to its monitor."""
        uuid = guest.uuid
        guest_dir = self.guest_dir(uuid)
        image = self.images.get(guest.image_ref)
        disks = [await self._disk(guest, vid) for vid in guest.volumes]
        cmd = build_command(
            binary=self.config.qemu_binary,
            uuid=uuid,
            kernel=image.kernel,
            initrd=image.initrd,
            memory_mb=self.config.guest_memory_mb or guest.memory_mb,
            guest_dir=guest_dir,
            accel=accel,
            cpu_model=self.config.cpu_model,
            hotplug_slots=self.config.hotplug_slots,
            disks=disks,
            incoming=incoming,
        )
        await asyncio.to_thread(_truncate, guest_dir / SERIAL_LOG)
        log = await asyncio.to_thread(open, guest_dir / QEMU_LOG, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                cwd=guest_dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # not in the agent's process group: outlives it
            )
            # With -daemonize the first process exits once QEMU is set up (QMP socket bound).
            code = await proc.wait()
        except OSError as exc:
            raise QemuError(uuid=uuid, reason=f"cannot run {cmd[0]}: {exc}") from exc
        finally:
            log.close()
        if code != 0:
            raise QemuError(uuid=uuid, reason=f"qemu exited {code}: {_tail(guest_dir / QEMU_LOG)}")
        client = await self._connect(uuid)
        async with self._qmp_errors(uuid, "query-kvm"):
            kvm = await client.execute("query-kvm", timeout=self.config.qmp_timeout_s)
        guest.accel = "kvm" if kvm.get("enabled") else "tcg"
        return client

    async def _connect(self, uuid: str) -> QMPClient:
        old = self._qmp.pop(uuid, None)
        if old is not None:
            await old.close()
        async with self._qmp_errors(uuid, "connect"):
            client = await QMPClient.connect(
                self.guest_dir(uuid) / QMP_SOCKET, timeout=self.config.qmp_timeout_s
            )
        self._qmp[uuid] = client
        return client

    async def _wait_heartbeat(self, guest: QemuGuest, serial: Path) -> None:
        deadline = time.monotonic() + self.config.boot_timeout_s
        offset = 0
        seen = b""
        while True:
            chunk = await asyncio.to_thread(_read_from, serial, offset)
            offset += len(chunk)
            seen = (seen + chunk)[-4096:]
            if HEARTBEAT.encode() in seen:
                return
            client = self._qmp.get(guest.uuid)
            if client is None or client.closed:
                raise QemuError(
                    uuid=guest.uuid,
                    reason=f"QEMU ended before the guest's init ran: {_tail(serial)}"
                    f" {_tail(self.guest_dir(guest.uuid) / QEMU_LOG)}",
                )
            if time.monotonic() >= deadline:
                raise QemuError(
                    uuid=guest.uuid,
                    reason=f"no heartbeat within {self.config.boot_timeout_s} s: {_tail(serial)}",
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

    async def _remove(self, uuid: str) -> None:
        await self._stop_process(uuid)
        await asyncio.to_thread(shutil.rmtree, self.guest_dir(uuid), True)

    async def _stop_process(self, uuid: str) -> None:
        """End the guest's QEMU (``quit``, then SIGKILL if it lingers) and forget its monitor."""
        client = self._qmp.pop(uuid, None)
        pid = process.guest_pid(self.guest_dir(uuid), uuid)
        if client is not None:
            with contextlib.suppress(QMPError):
                await client.execute("quit", timeout=2.0)
            await client.close()
        if pid is not None and not await process.wait_gone(pid, uuid, 3.0):
            await process.kill(pid, uuid)

    async def power_off(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if guest.phase is GuestPhase.STOPPED:
                return
            if guest.phase is not GuestPhase.RUNNING:
                raise InvalidGuestState(
                    uuid=guest.uuid, phase=guest.phase.value, action="power off"
                )
            # The busybox guest has no ACPI daemon: powering off ends its QEMU; the record stays.
            await self._stop_process(guest.uuid)
            guest.phase = GuestPhase.STOPPED
            await self._save(guest)

    async def power_on(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if guest.phase is GuestPhase.RUNNING:
                return
            if guest.phase is not GuestPhase.STOPPED:
                raise InvalidGuestState(uuid=guest.uuid, phase=guest.phase.value, action="power on")
            try:
                await self._boot(guest)
            except BaseException:
                await self._stop_process(guest.uuid)
                raise
            guest.phase = GuestPhase.RUNNING
            await self._save(guest)

    # --- volumes --------------------------------------------------------------------------

    async def attach_volume(self, instance: HasUUID, volume_id: str, mountpoint: str) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if guest.volumes.get(volume_id) == mountpoint:
                return  # a redelivered request: already done
            if guest.phase not in _ATTACH_PHASES:
                raise InvalidGuestState(
                    uuid=guest.uuid, phase=guest.phase.value, action="attach a volume"
                )
            self._check_volumes_free(guest.uuid, {volume_id: mountpoint})
            port = guest.free_port(self.config.hotplug_slots)
            if port is None:
                raise VolumeError(
                    f"instance {guest.uuid} has no free hot-plug slot "
                    f"({self.config.hotplug_slots} in use)",
                    uuid=guest.uuid,
                    volume_id=volume_id,
                )
            guest.ports[volume_id] = port
            try:
                disk = await self._disk(guest, volume_id)
                if guest.phase is GuestPhase.RUNNING:
                    await self._hotplug(guest.uuid, disk)
            except BaseException:
                del guest.ports[volume_id]
                raise
            guest.volumes[volume_id] = mountpoint
            await self._save(guest)
        LOG.info("qemu_volume_attached", uuid=guest.uuid, volume_id=volume_id, port=port)

    async def _hotplug(self, uuid: str, disk: Disk) -> None:
        client = self._require_qmp(uuid)
        timeout = self.config.qmp_timeout_s
        async with self._qmp_errors(uuid, "blockdev-add"):
            await client.execute("blockdev-add", disk.blockdev(), timeout=timeout)
        try:
            async with self._qmp_errors(uuid, "device_add"):
                await client.execute("device_add", disk.device(), timeout=timeout)
        except BaseException:
            with contextlib.suppress(QMPError):
                await client.execute("blockdev-del", {"node-name": disk.node_name}, timeout=timeout)
            raise

    async def detach_volume(self, instance: HasUUID, volume_id: str) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if volume_id not in guest.volumes:
                raise VolumeNotAttached(uuid=guest.uuid, volume_id=volume_id)
            if guest.phase not in _DETACH_PHASES:
                raise InvalidGuestState(
                    uuid=guest.uuid, phase=guest.phase.value, action="detach a volume"
                )
            client = self._qmp.get(guest.uuid)
            if client is not None and not client.closed:
                await self._unplug(guest.uuid, client, await self._disk(guest, volume_id))
            del guest.volumes[volume_id]
            guest.ports.pop(volume_id, None)
            await self._save(guest)
        LOG.info("qemu_volume_detached", uuid=guest.uuid, volume_id=volume_id)

    async def _unplug(self, uuid: str, client: QMPClient, disk: Disk) -> None:
        """device_del, wait for the guest's DEVICE_DELETED, blockdev-del.

        If the guest does not release the disk in time it stays attached (record unchanged)
        and VolumeDetachTimeout says so; a later detach finds the device gone and completes.
        """
        timeout = self.config.qmp_timeout_s
        # The first DEVICE_DELETED names only the virtio backend's QOM path; ours has the id.
        with client.listen("DEVICE_DELETED", lambda d: d.get("device") == disk.device_id) as gone:
            present = True
            try:
                await client.execute("device_del", {"id": disk.device_id}, timeout=timeout)
            except QMPCommandError as exc:
                if exc.error_class != "DeviceNotFound":
                    raise QemuError(uuid=uuid, reason=str(exc)) from exc
                present = False  # released after an earlier detach timed out
            except QMPError as exc:
                raise QemuError(uuid=uuid, reason=f"device_del: {exc}") from exc
            if present:
                try:
                    await gone.wait(self.config.detach_timeout_s)
                except QMPTimeout as exc:
                    raise VolumeDetachTimeout(
                        uuid=uuid, volume_id=disk.volume_id, timeout=self.config.detach_timeout_s
                    ) from exc
                except QMPError as exc:
                    raise QemuError(uuid=uuid, reason=f"waiting for DEVICE_DELETED: {exc}") from exc
        try:
            await client.execute("blockdev-del", {"node-name": disk.node_name}, timeout=timeout)
        except QMPCommandError as exc:
            LOG.warning("qemu_blockdev_del_failed", uuid=uuid, node=disk.node_name, error=str(exc))
        except QMPError as exc:
            raise QemuError(uuid=uuid, reason=f"blockdev-del: {exc}") from exc

    async def _disk(self, guest: QemuGuest, volume_id: str) -> Disk:
        """The disk of a volume, its file created (sparse) on first use."""
        path = self.config.volumes_path / volume_file_name(volume_id)
        await asyncio.to_thread(_ensure_volume_file, path, self.config.volume_size_mb)
        return Disk(volume_id=volume_id, path=path, port=guest.ports[volume_id])

    async def get_volumes(self, uuid: str) -> dict[str, str]:
        return dict(self._get(uuid).volumes)

    # --- firewall (recorded only: guests have no network here) ------------------------------

    async def refresh_instance_security_rules(
        self, instance: HasUUID, rules: Sequence[Mapping[str, Any]]
    ) -> None:
        normalized = normalize_rules(rules)
        guest = self._get(instance.uuid)
        if normalized != guest.rules:
            guest.rules = normalized
            await self._save(guest)

    async def get_firewall_rules(self, uuid: str) -> list[FirewallRule]:
        return [dict(r) for r in self._get(uuid).rules]

    async def unfilter_instance(self, instance: HasUUID) -> None:
        guest = self._guests.get(instance.uuid)
        if guest is not None and guest.rules:
            guest.rules = []
            await self._save(guest)

    # --- live migration ---------------------------------------------------------------------

    async def check_can_live_migrate_destination(
        self, instance: InstanceLike, source_host: str | None = None
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
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
            # Chosen here so the source learns it through the migrate data (loopback only).
            "qemu_migration_uri": f"tcp:127.0.0.1:{migration.free_port()}",
        }

    async def check_can_live_migrate_source(
        self, instance: InstanceLike, dest_check_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        guest = self._get(instance.uuid)
        if guest.phase is not GuestPhase.RUNNING:
            raise MigrationPreCheckError(
                uuid=guest.uuid, reason=f"guest is {guest.phase.value}, not running"
            )
        if dest_check_data.get("dest_host") == host:
            raise MigrationPreCheckError(uuid=guest.uuid, reason="destination is this host")
        if not dest_check_data.get("qemu_migration_uri"):
            raise MigrationPreCheckError(uuid=guest.uuid, reason="destination is not a QEMU host")
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
                "qemu_ports": dict(guest.ports),
                "firewall_rules": [dict(r) for r in guest.rules],
            }
        )
        return migrate_data

    async def pre_live_migration(
        self, instance: InstanceLike, migrate_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        source = migrate_data.get("source_host")
        volumes = {str(k): str(v) for k, v in dict(migrate_data.get("volumes") or {}).items()}
        result = {"dest_host": host, "volumes": volumes}
        existing = self._guests.get(uuid)
        if existing is not None:
            if existing.phase is GuestPhase.INCOMING and existing.migration_peer == source:
                return result  # a redelivered request: already prepared
            raise InstanceExists(uuid=uuid)
        uri = migrate_data.get("qemu_migration_uri")
        if not uri:
            raise MigrationPreCheckError(uuid=uuid, reason="no qemu_migration_uri in migrate data")
        image_ref = str(migrate_data.get("image_ref") or "")
        self.images.get(image_ref)
        ports = {str(k): int(v) for k, v in dict(migrate_data.get("qemu_ports") or {}).items()}
        if set(ports) != set(volumes):
            ports = {vid: i for i, vid in enumerate(volumes, start=1)}
        rules = normalize_rules(migrate_data.get("firewall_rules") or [])
        self._check_volumes_free(uuid, volumes)
        self._check_capacity(instance)
        guest = QemuGuest(
            uuid=uuid,
            vcpus=instance.vcpus,
            memory_mb=instance.memory_mb,
            root_gb=instance.root_gb,
            phase=GuestPhase.INCOMING,
            image_ref=image_ref,
            volumes=volumes,
            ports=ports,
            rules=rules,
            migration_peer=None if source is None else str(source),
        )
        self._guests[uuid] = guest
        try:
            await asyncio.to_thread(self.guest_dir(uuid).mkdir, parents=True, exist_ok=True)
            await self._save(guest)
            async with self._lock(uuid):
                # The same device set as the source (hot-plugged disks included), waiting.
                accel = "tcg" if self._kvm_broken or self.config.accel == "tcg" else "kvm"
                client = await self._start_qemu(guest, accel, incoming=True)
                async with self._qmp_errors(uuid, "migrate-incoming"):
                    timeout = self.config.qmp_timeout_s
                    caps = {"capabilities": migration.CAPABILITIES}
                    await client.execute("migrate-set-capabilities", caps, timeout=timeout)
                    await client.execute("migrate-incoming", {"uri": uri}, timeout=timeout)
                await self._save(guest)
        except BaseException:
            if self._guests.get(uuid) is guest:
                del self._guests[uuid]
                await self._remove(uuid)
            raise
        LOG.info("qemu_incoming_ready", uuid=uuid, source=source, uri=uri)
        return result

    async def live_migration(
        self,
        instance: InstanceLike,
        dest: str,
        migrate_data: Mapping[str, Any],
        progress_cb: ProgressCallback | None = None,
    ) -> MigrationResult:
        uuid = instance.uuid
        guest = self._get(uuid)
        if guest.phase is not GuestPhase.RUNNING:
            raise InvalidGuestState(uuid=uuid, phase=guest.phase.value, action="live-migrate")
        uri = migrate_data.get("qemu_migration_uri")
        if not uri:
            raise MigrationPreCheckError(uuid=uuid, reason="no qemu_migration_uri in migrate data")
        client = self._require_qmp(uuid)
        job = migration.CopyJob(dest=dest)
        self._jobs[uuid] = job
        guest.set_phase(GuestPhase.MIGRATING_OUT, peer=dest)
        reporter = ProgressReporter(progress_cb, 0.25, uuid)
        try:
            await self._save(guest)
            try:
                result = await migration.copy(
                    client,
                    uuid,
                    str(uri),
                    job,
                    reporter,
                    bandwidth_mb_s=_bandwidth_limit(migrate_data),
                    stall_s=self.config.migration_stall_s,
                    timeout=self.config.qmp_timeout_s,
                )
            except QMPError as exc:
                raise MigrationError(f"live migration of {uuid}: {exc}", uuid=uuid) from exc
            job.switching = True
            guest.set_phase(GuestPhase.MIGRATED_OUT, peer=dest)
            await self._save(guest)
        except BaseException:
            if not job.switching and self._guests.get(uuid) is guest:
                await self._cancel_copy(uuid, client)
                guest.set_phase(GuestPhase.RUNNING)
                await self._save(guest)
            raise
        finally:
            self._jobs.pop(uuid, None)
            job.finished.set()
            await reporter.close()
        LOG.info(
            "qemu_live_migration_done",
            uuid=uuid,
            dest=dest,
            seconds=result.duration_s,
            downtime_s=result.downtime_s,
            forced=result.forced,
        )
        return result

    async def _cancel_copy(self, uuid: str, client: QMPClient) -> None:
        """Make sure no copy runs and the guest runs here (after an abort, failure, cancel)."""
        with contextlib.suppress(QMPError):
            info = await client.execute("query-migrate", timeout=self.config.qmp_timeout_s)
            if str(info.get("status")) in migration.ACTIVE:
                await client.execute("migrate_cancel", timeout=self.config.qmp_timeout_s)
            status = await client.execute("query-status", timeout=self.config.qmp_timeout_s)
            if status.get("status") != "running":
                await client.execute("cont", timeout=self.config.qmp_timeout_s)

    async def live_migration_abort(self, uuid: str) -> None:
        job = self._jobs.get(uuid)
        if job is None or job.switching or job.forced:
            raise NoActiveMigration(uuid=uuid)
        job.abort_requested = True
        await job.finished.wait()

    async def live_migration_force_complete(self, uuid: str) -> None:
        job = self._jobs.get(uuid)
        if job is None or job.switching:
            raise NoActiveMigration(uuid=uuid)
        job.force_requested = True

    async def post_live_migration(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        guest = self._guests.get(uuid)
        if guest is None:
            return
        if guest.phase is not GuestPhase.MIGRATED_OUT:
            raise InvalidGuestState(
                uuid=uuid, phase=guest.phase.value, action="clean up after migration"
            )
        async with self._lock(uuid):
            if self._guests.pop(uuid, None) is not None:
                await self._remove(uuid)

    async def post_live_migration_at_destination(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if guest.phase is GuestPhase.RUNNING:
                return
            if guest.phase is not GuestPhase.INCOMING:
                raise InvalidGuestState(
                    uuid=guest.uuid, phase=guest.phase.value, action="finish incoming migration"
                )
            client = self._require_qmp(guest.uuid)
            deadline = time.monotonic() + self.config.boot_timeout_s
            async with self._qmp_errors(guest.uuid, "resume incoming guest"):
                while True:
                    status = await client.execute("query-status", timeout=self.config.qmp_timeout_s)
                    name = status.get("status")
                    if name == "running":
                        break
                    if name in ("paused", "postmigrate"):
                        await client.execute("cont", timeout=self.config.qmp_timeout_s)
                    elif time.monotonic() > deadline:
                        raise QemuError(uuid=guest.uuid, reason=f"incoming guest stays {name}")
                    await asyncio.sleep(0.05)
            guest.set_phase(GuestPhase.RUNNING)
            await self._save(guest)

    async def rollback_live_migration_at_destination(self, instance: HasUUID) -> None:
        uuid = instance.uuid
        guest = self._guests.get(uuid)
        if guest is None:
            return
        if guest.phase is not GuestPhase.INCOMING:
            raise InvalidGuestState(
                uuid=uuid, phase=guest.phase.value, action="roll back incoming migration"
            )
        async with self._lock(uuid):
            if self._guests.pop(uuid, None) is not None:
                await self._remove(uuid)

    async def rollback_live_migration_at_source(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if guest.phase is GuestPhase.RUNNING:
                return
            if guest.phase is not GuestPhase.MIGRATED_OUT:
                raise InvalidGuestState(
                    uuid=guest.uuid, phase=guest.phase.value, action="resume after migration"
                )
            client = self._require_qmp(guest.uuid)
            async with self._qmp_errors(guest.uuid, "cont"):
                await client.execute("cont", timeout=self.config.qmp_timeout_s)
            guest.set_phase(GuestPhase.RUNNING)
            await self._save(guest)

    # --- internals --------------------------------------------------------------------------

    def _require_host(self) -> str:
        if self.host is None:
            raise RuntimeError("QemuDriver.init_host() has not been called")
        return self.host

    def _get(self, uuid: str) -> QemuGuest:
        guest = self._guests.get(uuid)
        if guest is None:
            raise InstanceNotFound(uuid=uuid)
        return guest

    def _require_qmp(self, uuid: str) -> QMPClient:
        client = self._qmp.get(uuid)
        if client is None or client.closed:
            raise QemuError(uuid=uuid, reason="the guest's QEMU monitor is not connected")
        return client

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _qmp_errors(self, uuid: str, what: str) -> AsyncIterator[None]:
        """The one place QMP errors become the driver's QemuError."""
        try:
            yield
        except QMPError as exc:
            raise QemuError(uuid=uuid, reason=f"{what}: {exc}") from exc

    async def _save(self, guest: QemuGuest) -> None:
        guest_dir = self.guest_dir(guest.uuid)
        if guest_dir.is_dir():
            await asyncio.to_thread(write_record, guest_dir, guest)

    def _check_capacity(self, instance: InstanceLike) -> None:
        check_capacity(self._require_host(), self.config, self._guests.values(), instance)

    def _check_volumes_free(self, uuid: str, volumes: Mapping[str, str]) -> None:
        check_volumes_free(self._guests.values(), uuid, volumes)


def _volumes_from_bdi(uuid: str, block_device_info: BlockDeviceInfo | None) -> dict[str, str]:
    volumes: dict[str, str] = {}
    for bdm in block_device_info or ():
        volume_id = bdm["volume_id"]
        mountpoint = bdm.get("mountpoint") or bdm.get("device_name") or f"/dev/vd{len(volumes)}"
        if volume_id in volumes or mountpoint in volumes.values():
            raise VolumeAlreadyAttached(uuid=uuid, volume_id=volume_id, mountpoint=mountpoint)
        volumes[volume_id] = mountpoint
    return volumes


def _subdirs(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except FileNotFoundError:
        return b""


def _tail(path: Path, limit: int = 400) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip().replace("\n", " | ")


def _ensure_volume_file(path: Path, size_mb: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with open(path, "xb") as handle:
            handle.truncate(size_mb * 1024 * 1024)


def _bandwidth_limit(migrate_data: Mapping[str, Any]) -> float | None:
    """The migration's bandwidth cap in MB/s, when the caller set a valid one."""
    value = migrate_data.get("bandwidth_limit_mb_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None
