"""The QEMU test kit's serial-log readers, and the guest record's stored form, without QEMU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from compute_agent.virt.models import GuestPhase
from compute_agent.virt.qemu.guest import QemuGuest, read_record, write_record
from compute_agent.virt.qemu.testing import (
    first_heartbeat,
    last_heartbeat,
    serial_path,
    wait_disks,
    wait_new_heartbeat,
)

CONSOLE = (
    "SeaBIOS noise\r\n"
    "fleet-guest: init ready kernel=6.1.0-57-amd64\n"
    "fleet-guest: disks []\n"
    "fleet-guest: heartbeat 1\n"
    "fleet-guest: heartbeat 2\n"
)


def test_heartbeat_counters_are_read_from_the_console(tmp_path: Path) -> None:
    log = serial_path(tmp_path, "host-a", "u1")
    assert (first_heartbeat(log), last_heartbeat(log)) == (None, None)  # no log yet
    log.parent.mkdir(parents=True)
    log.write_text(CONSOLE)
    assert (first_heartbeat(log), last_heartbeat(log)) == (1, 2)


async def test_waiters_see_lines_printed_later_and_time_out_clearly(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text(CONSOLE)

    def append() -> None:
        with open(log, "a") as handle:
            handle.write("fleet-guest: disks [vda]\nfleet-guest: heartbeat 3\n")

    async def guest_prints() -> None:
        await asyncio.sleep(0.1)
        await asyncio.to_thread(append)

    printing = asyncio.create_task(guest_prints())
    assert await wait_new_heartbeat(log, timeout=5) == 3  # not the 2 already there
    await wait_disks(log, "disks [vda]", timeout=1)
    await printing
    with pytest.raises(TimeoutError, match="not disks"):
        await wait_disks(log, "disks []", timeout=0.2)


def test_guest_record_round_trip_keeps_the_common_and_qemu_fields(tmp_path: Path) -> None:
    guest = QemuGuest(
        uuid="u1",
        vcpus=1,
        memory_mb=128,
        root_gb=1,
        phase=GuestPhase.RUNNING,
        image_ref="fleet-busybox",
        volumes={"vol-1": "/dev/vdb"},
        ports={"vol-1": 1},
        accel="tcg",
    )
    guest.set_phase(GuestPhase.MIGRATING_OUT, peer="host-b")
    write_record(tmp_path, guest)
    assert read_record(tmp_path) == guest
    assert read_record(tmp_path).free_port(8) == 2
