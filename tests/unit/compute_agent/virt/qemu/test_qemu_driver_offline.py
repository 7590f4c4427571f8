"""The QEMU driver's behaviour that needs no QEMU: recovery from disk, refusals, firewall."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_agent.virt import GuestPhase, GuestSpec, PowerState
from compute_agent.virt.exceptions import (
    InstanceExists,
    InvalidGuestState,
    MigrationPreCheckError,
    NoActiveMigration,
)
from compute_agent.virt.qemu import ImageNotFound, QemuDriver, QemuDriverConfig
from compute_agent.virt.qemu.guest import QemuGuest, write_record

SPEC = GuestSpec(uuid="7d0c6d1a-0000-4000-8000-000000000001", memory_mb=256)


async def make(tmp_path: Path) -> QemuDriver:
    driver = QemuDriver(QemuDriverConfig(state_dir=tmp_path / "hv", image_dir=tmp_path / "images"))
    await driver.init_host("host-a")
    return driver


def record(tmp_path: Path, phase: GuestPhase, uuid: str = SPEC.uuid) -> None:
    guest_dir = tmp_path / "hv" / "qemu-host-a" / uuid
    guest_dir.mkdir(parents=True)
    guest = QemuGuest(
        uuid=uuid,
        vcpus=1,
        memory_mb=256,
        root_gb=1,
        phase=phase,
        image_ref="fleet-busybox",
        volumes={"vol-1": "/dev/vdb"},
        ports={"vol-1": 1},
    )
    write_record(guest_dir, guest)
    (guest_dir / "qemu.pid").write_text("999999999\n")  # a pid that cannot be alive


async def test_unknown_image_fails_the_spawn_and_leaves_nothing(tmp_path: Path) -> None:
    driver = await make(tmp_path)
    with pytest.raises(ImageNotFound, match="cirros"):
        await driver.spawn(SPEC, "cirros")
    assert await driver.list_instance_uuids() == []
    assert list((tmp_path / "hv" / "qemu-host-a").iterdir()) == []


async def test_restart_finds_guests_whose_qemu_died_stopped_and_builds_in_error(
    tmp_path: Path,
) -> None:
    other = "7d0c6d1a-0000-4000-8000-000000000002"
    record(tmp_path, GuestPhase.RUNNING)
    record(tmp_path, GuestPhase.SPAWNING, uuid=other)
    driver = await make(tmp_path)
    info = await driver.get_info(SPEC.uuid)
    assert (info.phase, info.power_state) == (GuestPhase.STOPPED, PowerState.SHUTDOWN)
    assert info.volumes == {"vol-1": "/dev/vdb"}
    building = await driver.get_info(other)
    assert (building.phase, building.interrupted) == (GuestPhase.ERROR, "spawn")
    with pytest.raises(InstanceExists):
        await driver.spawn(SPEC, "fleet-busybox")
    await driver.destroy(SPEC)
    await driver.destroy(SPEC)  # idempotent
    assert await driver.list_instance_uuids() == [other]
    assert not (tmp_path / "hv" / "qemu-host-a" / SPEC.uuid).exists()


async def test_rules_are_recorded_and_reported(tmp_path: Path) -> None:
    record(tmp_path, GuestPhase.RUNNING)
    driver = await make(tmp_path)
    rule = {"protocol": "TCP", "from_port": 22, "to_port": 22, "cidr": "10.1.2.3/16"}
    await driver.refresh_instance_security_rules(SPEC, [rule])
    (applied,) = await driver.get_firewall_rules(SPEC.uuid)
    assert (applied["protocol"], applied["cidr"]) == ("tcp", "10.1.0.0/16")
    restarted = await make(tmp_path)
    assert await restarted.get_firewall_rules(SPEC.uuid) == [applied]
    await restarted.unfilter_instance(SPEC)
    assert await restarted.get_firewall_rules(SPEC.uuid) == []


async def test_migration_prechecks_and_calls_without_a_copy(tmp_path: Path) -> None:
    record(tmp_path, GuestPhase.RUNNING)
    driver = await make(tmp_path)
    with pytest.raises(MigrationPreCheckError, match="already on host-a"):
        await driver.check_can_live_migrate_destination(SPEC, "host-b")
    with pytest.raises(MigrationPreCheckError, match="is the source"):
        await driver.check_can_live_migrate_destination(SPEC, "host-a")
    other = GuestSpec(uuid="7d0c6d1a-0000-4000-8000-0000000000ff")
    dest = await driver.check_can_live_migrate_destination(other, "host-b")
    assert dest["qemu_migration_uri"].startswith("tcp:127.0.0.1:")
    with pytest.raises(MigrationPreCheckError, match="guest is stopped"):
        await driver.check_can_live_migrate_source(SPEC, {"dest_host": "host-b"})
    with pytest.raises(NoActiveMigration):
        await driver.live_migration_abort(SPEC.uuid)
    with pytest.raises(NoActiveMigration):
        await driver.live_migration_force_complete(SPEC.uuid)
    with pytest.raises(InvalidGuestState):
        await driver.post_live_migration(SPEC)  # the only copy: never removed as a source
    with pytest.raises(InvalidGuestState):
        await driver.rollback_live_migration_at_destination(SPEC)
    await driver.post_live_migration(other)  # absent: nothing to do
    await driver.rollback_live_migration_at_destination(other)
    resources = await driver.get_available_resource()
    assert (resources.hypervisor_type, resources.memory_mb_used) == ("qemu", 256)
