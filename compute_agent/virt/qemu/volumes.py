"""The QEMU driver's volumes: raw files hot-plugged as virtio-blk on a free PCIe root port.

Attach is ``blockdev-add`` + ``device_add``; detach is ``device_del``, waiting for the guest's
``DEVICE_DELETED``, then ``blockdev-del``, with a timeout and a clear error when the guest does
not release the disk. A stopped guest's volumes are recorded and plugged at its next boot."""

from __future__ import annotations

import contextlib

import structlog

from compute_agent.virt._checks import attach_needed, check_detach
from compute_agent.virt.exceptions import VolumeError
from compute_agent.virt.models import GuestPhase, HasUUID
from compute_agent.virt.qemu.cmdline import Disk
from compute_agent.virt.qemu.errors import (
    QemuError,
    QMPCommandError,
    QMPError,
    QMPTimeout,
    VolumeDetachTimeout,
)
from compute_agent.virt.qemu.host import QemuHost
from compute_agent.virt.qemu.qmp import QMPClient

LOG = structlog.get_logger(__name__)


class QemuVolumes(QemuHost):
    """Volume attach and detach of the QEMU driver."""

    async def attach_volume(self, instance: HasUUID, volume_id: str, mountpoint: str) -> None:
        async with self._lock(instance.uuid):
            guest = self._get(instance.uuid)
            if not attach_needed(guest, volume_id, mountpoint):
                return
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
            check_detach(guest, volume_id)
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

    async def get_volumes(self, uuid: str) -> dict[str, str]:
        return dict(self._get(uuid).volumes)
