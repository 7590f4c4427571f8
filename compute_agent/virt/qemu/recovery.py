"""The QEMU driver at agent start and stop: re-attach to the guests' QEMU processes (they outlive
the agent), settle what a killed agent left half done on this host, and let them run on when
the agent stops (only the monitor connections are closed)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import structlog

from compute_agent.virt.models import GuestPhase
from compute_agent.virt.qemu import process
from compute_agent.virt.qemu.cmdline import QMP_SOCKET
from compute_agent.virt.qemu.errors import QMPError
from compute_agent.virt.qemu.guest import QemuGuest, read_record
from compute_agent.virt.qemu.host import QemuHost
from compute_agent.virt.qemu.qmp import QMPClient

LOG = structlog.get_logger(__name__)


class QemuRecovery(QemuHost):
    """Adoption of the guests found on disk at start; the stop that leaves them running."""

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


def _subdirs(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
