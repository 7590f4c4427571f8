"""The QEMU driver with real guests: boot to the first heartbeat, hot-plug, power, re-attach."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from compute_agent.virt import GuestPhase, GuestSpec, PowerState
from compute_agent.virt.qemu import QemuDriver, QemuDriverConfig, VolumeDetachTimeout
from compute_agent.virt.qemu.cmdline import SERIAL_LOG
from compute_agent.virt.qemu.testing import guest_processes, last_disks_line, wait_serial

pytestmark = pytest.mark.qemu

IMAGE = "fleet-busybox"
SPEC = GuestSpec(uuid="9a7e0000-0000-4000-8000-000000000001", memory_mb=512)


def serial(driver: QemuDriver, uuid: str = SPEC.uuid) -> Path:
    return driver.guest_dir(uuid) / SERIAL_LOG


async def wait_disks(driver: QemuDriver, expected: str, timeout: float = 15) -> float:
    began = time.monotonic()
    while last_disks_line(serial(driver)) != expected:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"guest reports {last_disks_line(serial(driver))}, not {expected}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_boot_hotplug_and_destroy_leave_nothing_behind(
    qemu_driver: QemuDriver, qemu_state_dir: Path
) -> None:
    driver = qemu_driver
    began = time.monotonic()
    await driver.spawn(
        SPEC,
        IMAGE,
        security_rules=[{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "0.0.0.0/0"}],
    )
    boot_s = time.monotonic() - began
    # ACTIVE only after the init's first heartbeat: it is in the log when spawn returns.
    assert "fleet-guest: heartbeat 1" in serial(driver).read_text()
    info = await driver.get_info(SPEC.uuid)
    assert (info.phase, info.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
    assert last_disks_line(serial(driver)) == "disks []"
    assert len(await driver.get_firewall_rules(SPEC.uuid)) == 1
    (pid,) = guest_processes(qemu_state_dir)["host-a"].values()

    began = time.monotonic()
    await driver.attach_volume(SPEC, "vol-a", "/dev/vdb")
    attach_call_s = time.monotonic() - began
    attach_seen_s = attach_call_s + await wait_disks(driver, "disks [vda]")
    assert await driver.get_volumes(SPEC.uuid) == {"vol-a": "/dev/vdb"}

    began = time.monotonic()
    await driver.detach_volume(SPEC, "vol-a")
    detach_s = time.monotonic() - began
    await wait_disks(driver, "disks []")
    assert await driver.get_volumes(SPEC.uuid) == {}

    await driver.destroy(SPEC)
    assert guest_processes(qemu_state_dir) == {}
    assert not driver.guest_dir(SPEC.uuid).exists()
    print(
        f"\nqemu figures: boot to first heartbeat {boot_s:.2f} s; attach call "
        f"{attach_call_s:.2f} s, seen by the guest {attach_seen_s:.2f} s; detach "
        f"(DEVICE_DELETED) {detach_s:.2f} s; pid {pid}"
    )


async def test_an_unacknowledged_detach_times_out_and_keeps_the_disk(
    qemu_driver: QemuDriver,
) -> None:
    driver = qemu_driver
    await driver.spawn(SPEC, IMAGE)
    await driver.attach_volume(SPEC, "vol-b", "/dev/vdb")
    await wait_disks(driver, "disks [vda]")
    await driver.qmp(SPEC.uuid, "stop")  # a paused guest cannot acknowledge the unplug
    assert (await driver.get_info(SPEC.uuid)).power_state == PowerState.PAUSED
    with pytest.raises(VolumeDetachTimeout, match="did not release the disk within 3"):
        await driver.detach_volume(SPEC, "vol-b")
    assert await driver.get_volumes(SPEC.uuid) == {"vol-b": "/dev/vdb"}
    await driver.qmp(SPEC.uuid, "cont")
    # Once the guest runs again a retry completes (the device may already be gone by then).
    await driver.detach_volume(SPEC, "vol-b")
    await wait_disks(driver, "disks []")
    assert await driver.get_volumes(SPEC.uuid) == {}


async def test_power_cycle_and_reattach_after_agent_restart(
    qemu_driver: QemuDriver, qemu_state_dir: Path, guest_image_dir: Path
) -> None:
    driver = qemu_driver
    await driver.spawn(
        SPEC, IMAGE, block_device_info=[{"volume_id": "vol-c", "mountpoint": "/dev/vdb"}]
    )
    assert last_disks_line(serial(driver)) == "disks [vda]"  # cold-plugged at boot
    await driver.power_off(SPEC)
    assert (await driver.get_info(SPEC.uuid)).power_state == PowerState.SHUTDOWN
    assert guest_processes(qemu_state_dir) == {}
    await driver.power_on(SPEC)
    assert last_disks_line(serial(driver)) == "disks [vda]"  # the volume came back with it

    # A second driver on the same state dir (the agent restarted) finds the running guest.
    await driver.cleanup_host()
    restarted = QemuDriver(driver.config)
    await restarted.init_host("host-a")
    info = await restarted.get_info(SPEC.uuid)
    assert (info.phase, info.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
    assert info.volumes == {"vol-c": "/dev/vdb"}
    size = serial(restarted).stat().st_size
    await wait_serial(serial(restarted), "heartbeat", timeout=10, start=size)  # still alive
    await restarted.detach_volume(SPEC, "vol-c")
    await restarted.destroy(SPEC)
    assert guest_processes(qemu_state_dir) == {}
    assert isinstance(restarted.config, QemuDriverConfig)
