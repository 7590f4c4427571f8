"""Live migration of a real guest between two QEMU drivers on one machine (issue 18 c)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from compute_agent.virt import GuestPhase, GuestSpec, MigrationProgress, PowerState
from compute_agent.virt.exceptions import MigrationAborted
from compute_agent.virt.qemu import QemuDriver
from compute_agent.virt.qemu.cmdline import SERIAL_LOG
from compute_agent.virt.qemu.testing import guest_processes, last_disks_line, wait_serial

pytestmark = pytest.mark.qemu

IMAGE = "fleet-busybox"
SPEC = GuestSpec(uuid="9a7e0000-0000-4000-8000-0000000000aa", memory_mb=512)


def heartbeats(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"fleet-guest: heartbeat (\d+)", path.read_text())]


async def prepare(src: QemuDriver, dst: QemuDriver, **extra: object) -> dict[str, object]:
    dest_data = await dst.check_can_live_migrate_destination(SPEC, "host-a")
    migrate_data = await src.check_can_live_migrate_source(SPEC, dest_data)
    migrate_data.update(extra)
    await dst.pre_live_migration(SPEC, migrate_data)
    return migrate_data


async def test_migration_keeps_the_guest_running_with_its_disk(
    qemu_driver: QemuDriver, qemu_state_dir: Path
) -> None:
    src = qemu_driver
    dst = QemuDriver(src.config)
    await dst.init_host("host-b")
    try:
        await src.spawn(SPEC, IMAGE)
        await src.attach_volume(SPEC, "vol-m", "/dev/vdb")
        await wait_serial(src.guest_dir(SPEC.uuid) / SERIAL_LOG, "disks [vda]", timeout=15)
        await wait_serial(src.guest_dir(SPEC.uuid) / SERIAL_LOG, "heartbeat 3", timeout=15)
        began = time.monotonic()
        migrate_data = await prepare(src, dst)
        assert (await dst.get_info(SPEC.uuid)).phase is GuestPhase.INCOMING
        reports: list[MigrationProgress] = []

        async def progress(p: MigrationProgress) -> None:
            reports.append(p)

        before = heartbeats(src.guest_dir(SPEC.uuid) / SERIAL_LOG)[-1]
        result = await src.live_migration(SPEC, "host-b", migrate_data, progress)
        await dst.post_live_migration_at_destination(SPEC)
        await src.post_live_migration(SPEC)
        total_s = time.monotonic() - began
        serial_b = dst.guest_dir(SPEC.uuid) / SERIAL_LOG
        await wait_serial(serial_b, "heartbeat", timeout=10)
        after = heartbeats(serial_b)
        # The counter continues on the destination: same guest, no reboot.
        assert after[0] > before and after[0] != 1
        assert {h: set(g) for h, g in guest_processes(qemu_state_dir).items()} == {
            "host-b": {SPEC.uuid}
        }
        info = await dst.get_info(SPEC.uuid)
        assert (info.phase, info.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
        assert info.volumes == {"vol-m": "/dev/vdb"}
        assert result.memory_total > 100 * 1024 * 1024
        percents = [r.percent for r in reports]
        assert percents == sorted(percents) and percents[-1] == 100
        # The disk moved with it: the guest can still let it go.
        await dst.detach_volume(SPEC, "vol-m")
        await wait_serial(serial_b, "disks []", timeout=15)
        assert last_disks_line(serial_b) == "disks []"
        print(
            f"\nqemu migration: {result.duration_s:.2f} s in QEMU, downtime "
            f"{result.downtime_s * 1000:.0f} ms, whole sequence {total_s:.2f} s, "
            f"{len(reports)} progress reports, heartbeat {before} -> {after[0]}"
        )
    finally:
        for _ in await dst.list_instance_uuids():
            await dst.destroy(SPEC)
        await dst.cleanup_host()


async def test_abort_leaves_the_guest_on_the_source_and_force_completes(
    qemu_driver: QemuDriver, qemu_state_dir: Path
) -> None:
    src = qemu_driver
    dst = QemuDriver(src.config)
    await dst.init_host("host-b")
    try:
        await src.spawn(SPEC, IMAGE)
        # 1 MB/s: 128 MB would take two minutes, time enough to abort mid-way.
        migrate_data = await prepare(src, dst, bandwidth_limit_mb_s=1)
        reports: list[MigrationProgress] = []
        reported = asyncio.Event()

        async def progress(p: MigrationProgress) -> None:
            reports.append(p)
            reported.set()

        copy = asyncio.create_task(src.live_migration(SPEC, "host-b", migrate_data, progress))
        await asyncio.wait_for(reported.wait(), 30)
        began = time.monotonic()
        await src.live_migration_abort(SPEC.uuid)
        abort_s = time.monotonic() - began
        with pytest.raises(MigrationAborted):
            await copy
        info = await src.get_info(SPEC.uuid)
        assert (info.phase, info.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
        serial_a = src.guest_dir(SPEC.uuid) / SERIAL_LOG
        size = serial_a.stat().st_size
        await wait_serial(serial_a, "heartbeat", timeout=10, start=size)
        await dst.rollback_live_migration_at_destination(SPEC)
        assert set(guest_processes(qemu_state_dir)) == {"host-a"}

        # A fresh destination, the same cap; force-complete switches to post-copy.
        migrate_data = await prepare(src, dst, bandwidth_limit_mb_s=1)
        reported.clear()
        copy = asyncio.create_task(src.live_migration(SPEC, "host-b", migrate_data, progress))
        await asyncio.wait_for(reported.wait(), 30)
        await src.live_migration_force_complete(SPEC.uuid)
        result = await asyncio.wait_for(copy, 180)
        assert result.forced
        await dst.post_live_migration_at_destination(SPEC)
        await src.post_live_migration(SPEC)
        serial_b = dst.guest_dir(SPEC.uuid) / SERIAL_LOG
        await wait_serial(serial_b, "heartbeat", timeout=30)
        assert set(guest_processes(qemu_state_dir)) == {"host-b"}
        print(f"\nqemu abort took {abort_s:.2f} s; forced migration {result.duration_s:.2f} s")
    finally:
        for _ in await dst.list_instance_uuids():
            await dst.destroy(SPEC)
        await dst.cleanup_host()
