"""The QEMU driver's share of live migration: prechecks, the incoming QEMU on the destination
(same device set, ``-incoming defer``), the copy on the source (``migration.py``), abort and
force-complete, and each side's ending (resume, or remove its copy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import structlog

from compute_agent.virt._checks import removal_needed, require_phase, transition_needed
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
    MigrationError,
    MigrationPreCheckError,
    NoActiveMigration,
)
from compute_agent.virt.firewall import normalize_rules
from compute_agent.virt.models import GuestPhase, HasUUID, InstanceLike, MigrationResult
from compute_agent.virt.qemu import migration
from compute_agent.virt.qemu.errors import QemuError, QMPError
from compute_agent.virt.qemu.guest import QemuGuest
from compute_agent.virt.qemu.host import QemuHost

LOG = structlog.get_logger(__name__)


class QemuLiveMigration(QemuHost):
    """Live migration of the QEMU driver (source and destination halves)."""

    async def check_can_live_migrate_destination(
        self, instance: InstanceLike, source_host: str | None = None
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        check_destination(host, uuid, source_host, self._guests.get(uuid))
        self._check_capacity(instance)
        data = destination_data(host, source_host, await self.get_available_resource())
        # Chosen here so the source learns it through the migrate data (loopback only).
        data["qemu_migration_uri"] = f"tcp:127.0.0.1:{migration.free_port()}"
        return data

    async def check_can_live_migrate_source(
        self, instance: InstanceLike, dest_check_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        guest = self._get(instance.uuid)
        check_source(host, guest, dest_check_data)
        if not dest_check_data.get("qemu_migration_uri"):
            raise MigrationPreCheckError(uuid=guest.uuid, reason="destination is not a QEMU host")
        migrate_data = source_data(host, guest, dest_check_data)
        migrate_data["qemu_ports"] = dict(guest.ports)
        return migrate_data

    async def pre_live_migration(
        self, instance: InstanceLike, migrate_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        host = self._require_host()
        uuid = instance.uuid
        source = migrate_data.get("source_host")
        volumes = incoming_volumes(migrate_data)
        result = {"dest_host": host, "volumes": volumes}
        if incoming_prepared(self._guests.get(uuid), uuid, source):
            return result
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
        require_phase(guest, GuestPhase.RUNNING, "live-migrate")
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
                    bandwidth_mb_s=bandwidth_limit(migrate_data),
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
        await self._remove_copy(instance.uuid, GuestPhase.MIGRATED_OUT, "clean up after migration")

    async def post_live_migration_at_destination(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            action = "finish incoming migration"
            if not transition_needed(guest, GuestPhase.RUNNING, GuestPhase.INCOMING, action):
                return
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
        await self._remove_copy(instance.uuid, GuestPhase.INCOMING, "roll back incoming migration")

    async def _remove_copy(self, uuid: str, phase: GuestPhase, action: str) -> None:
        """Remove this host's copy of a migrated guest — only while it is in ``phase`` (the
        half that no longer runs: the source's after the switch-over, the destination's after
        a rollback). Gone already: done (a redelivered request)."""
        if not removal_needed(self._guests.get(uuid), phase, action):
            return
        async with self._lock(uuid):
            if self._guests.pop(uuid, None) is not None:
                await self._remove(uuid)

    async def rollback_live_migration_at_source(self, instance: HasUUID) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            action = "resume after migration"
            if not transition_needed(guest, GuestPhase.RUNNING, GuestPhase.MIGRATED_OUT, action):
                return
            client = self._require_qmp(guest.uuid)
            async with self._qmp_errors(guest.uuid, "cont"):
                await client.execute("cont", timeout=self.config.qmp_timeout_s)
            guest.set_phase(GuestPhase.RUNNING)
            await self._save(guest)
