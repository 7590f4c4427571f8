"""``QemuHost``: the state one QEMU host's driver parts share, and its guests' QEMU processes.

The guest table (records, monitor connections, per-guest locks, copy jobs), the directories, and
what every part needs of a guest's process: start it (daemonized, so it outlives the agent),
connect to its monitor, stop it, make sure no copy runs. The driver's capabilities are built on
it, one module each: ``lifecycle.py`` (spawn, power, destroy, inventory), ``volumes.py``,
``live_migration.py``, ``recovery.py`` (re-attaching at start); ``driver.py`` assembles them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from compute_agent.virt.capacity import check_capacity, check_volumes_free
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import InstanceNotFound
from compute_agent.virt.models import InstanceLike
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
from compute_agent.virt.qemu.errors import QemuError, QMPError
from compute_agent.virt.qemu.guest import QemuGuest, write_record
from compute_agent.virt.qemu.image import ImageCatalogue
from compute_agent.virt.qemu.qmp import QMPClient


class QemuHost(ComputeDriver):
    """The guests of one host and their QEMU processes (see the module docstring)."""

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

    @property
    def host_dir(self) -> Path:
        """The directory of this host's guests."""
        return self.config.state_dir / f"qemu-{self._require_host()}"

    def guest_dir(self, uuid: str) -> Path:
        """The directory of one guest (record, serial log, QMP socket, pid file)."""
        return self.host_dir / uuid

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
        await asyncio.to_thread(truncate, guest_dir / SERIAL_LOG)
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
            raise QemuError(uuid=uuid, reason=f"qemu exited {code}: {tail(guest_dir / QEMU_LOG)}")
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

    async def _cancel_copy(self, uuid: str, client: QMPClient) -> None:
        """Make sure no copy runs and the guest runs here (after an abort, failure, cancel)."""
        with contextlib.suppress(QMPError):
            info = await client.execute("query-migrate", timeout=self.config.qmp_timeout_s)
            if str(info.get("status")) in migration.ACTIVE:
                await client.execute("migrate_cancel", timeout=self.config.qmp_timeout_s)
            status = await client.execute("query-status", timeout=self.config.qmp_timeout_s)
            if status.get("status") != "running":
                await client.execute("cont", timeout=self.config.qmp_timeout_s)

    async def _disk(self, guest: QemuGuest, volume_id: str) -> Disk:
        """The disk of a volume, its file created (sparse) on first use."""
        path = self.config.volumes_path / volume_file_name(volume_id)
        await asyncio.to_thread(ensure_volume_file, path, self.config.volume_size_mb)
        return Disk(volume_id=volume_id, path=path, port=guest.ports[volume_id])

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


def truncate(path: Path) -> None:
    """Empty a file (a guest's serial log before each start of its QEMU)."""
    path.write_bytes(b"")


def read_from(path: Path, offset: int) -> bytes:
    """What a growing file holds after byte ``offset`` (nothing while it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except FileNotFoundError:
        return b""


def tail(path: Path, limit: int = 400) -> str:
    """The end of a log on one line, for an error message."""
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip().replace("\n", " | ")


def ensure_volume_file(path: Path, size_mb: int) -> None:
    """Create a volume's raw file (sparse, ``size_mb``) unless it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with open(path, "xb") as handle:
            handle.truncate(size_mb * 1024 * 1024)
