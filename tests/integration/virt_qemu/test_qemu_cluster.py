"""Real guests under the real services: two agents with the QEMU driver (issue 18 a, b)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from compute_agent.virt.qemu.cmdline import QMP_TOOLS_SOCKET, SERIAL_LOG
from compute_agent.virt.qemu.qmp import QMPClient
from compute_agent.virt.qemu.testing import (
    guest_processes,
    serial_path,
    wait_copying,
    wait_disks,
    wait_migration,
)
from shared_objects import exception
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.instance import InstanceList

pytestmark = [pytest.mark.qemu, pytest.mark.integration]

IMAGE = "fleet-busybox"
HEARTBEAT = "fleet-guest: heartbeat 1"


async def fleetctl_list(cluster: Any) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "FLEET_TRANSPORT_URL": cluster.operator_url,
        "FLEET_CONTROL_EXCHANGE": cluster.spec.control_exchange,
    }
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "conductor.tools.fleetctl", "--format", "json", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


async def test_three_guests_over_two_agents_active_only_after_their_init(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    began = time.monotonic()
    uuids: list[str] = []
    for n, host in enumerate(("compute-1", "compute-2", None)):
        uuids += await cluster.boot(
            flavor="small", name=f"vm{n}", image_ref=IMAGE, forced_host=host
        )
    active_at: dict[str, float] = {}
    while len(active_at) < 3:
        for inst in await InstanceList.get_by_uuids(cluster.ctxt, uuids):
            assert inst.vm_state != "error", inst.uuid
            if inst.vm_state == "active" and inst.uuid not in active_at:
                # The log only grows: the init's line was there before ACTIVE was written.
                assert HEARTBEAT in serial_path(state, inst.host, inst.uuid).read_text(), inst.uuid
                active_at[inst.uuid] = time.monotonic() - began
        assert time.monotonic() - began < 240, f"not all ACTIVE: {active_at}"
        await asyncio.sleep(0.2)
    insts = await InstanceList.get_by_uuids(cluster.ctxt, uuids)
    assert {i.host for i in insts} == {"compute-1", "compute-2"}
    running = {uuid: host for host, guests in guest_processes(state).items() for uuid in guests}
    assert running == {i.uuid: i.host for i in insts}
    listed = {r["uuid"]: r["host"] for r in await fleetctl_list(cluster)}
    assert listed == running
    print(f"\nACTIVE after (s, from the first request): {sorted(active_at.values())}")

    for uuid in uuids:
        await cluster.tasks.delete_instance(cluster.ctxt, instance_uuid=uuid)
    await cluster.wait_instances(uuids, deleted=True, timeout=60)
    assert guest_processes(state) == {}


async def test_volume_seen_by_the_guest_and_an_unacknowledged_detach_is_a_clear_error(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    (uuid,) = await cluster.boot(flavor="small", name="vm", image_ref=IMAGE)
    (inst,) = await cluster.wait_instances([uuid], timeout=180)
    assert inst.vm_state == "active"
    host = inst.host
    tasks, ctxt = cluster.tasks, cluster.ctxt

    await tasks.attach_volume(ctxt, instance_uuid=uuid, volume_id="vol-1", device_name="/dev/vdb")
    await wait_disks(serial_path(state, host, uuid), "disks [vda]")
    await tasks.detach_volume(ctxt, instance_uuid=uuid, volume_id="vol-1")
    await wait_disks(serial_path(state, host, uuid), "disks []")
    assert list(await BlockDeviceMappingList.get_by_instance_uuid(ctxt, uuid)) == []

    await tasks.attach_volume(ctxt, instance_uuid=uuid, volume_id="vol-2", device_name="/dev/vdb")
    await wait_disks(serial_path(state, host, uuid), "disks [vda]")
    # Pause the guest through the operators' monitor: it cannot acknowledge the unplug.
    tools = await QMPClient.connect(state / f"qemu-{host}" / uuid / QMP_TOOLS_SOCKET)
    try:
        await tools.execute("stop")
        with pytest.raises(exception.VolumeError, match="did not release the disk"):
            await tasks.detach_volume(ctxt, instance_uuid=uuid, volume_id="vol-2")
        bdms = list(await BlockDeviceMappingList.get_by_instance_uuid(ctxt, uuid))
        assert [b.volume_id for b in bdms] == ["vol-2"]  # consistent: still attached
        record = json.loads((state / f"qemu-{host}" / uuid / "guest.json").read_text())
        assert record["volumes"] == {"vol-2": "/dev/vdb"}
        await tools.execute("cont")
    finally:
        await tools.close()
    await tasks.detach_volume(ctxt, instance_uuid=uuid, volume_id="vol-2")
    await wait_disks(serial_path(state, host, uuid), "disks []")
    assert list(await BlockDeviceMappingList.get_by_instance_uuid(ctxt, uuid)) == []
    await tasks.delete_instance(ctxt, instance_uuid=uuid)
    await cluster.wait_instances([uuid], deleted=True, timeout=60)
    assert guest_processes(state) == {}


async def test_live_migration_between_agents_keeps_the_guest_running(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    (uuid,) = await cluster.boot(
        flavor="small", name="vm", image_ref=IMAGE, forced_host="compute-1"
    )
    (inst,) = await cluster.wait_instances([uuid], timeout=180)
    assert inst.vm_state == "active"
    source_log = state / "qemu-compute-1" / uuid / SERIAL_LOG
    before = int(source_log.read_text().rsplit("heartbeat ", 1)[1].split()[0])
    mig = await cluster.tasks.live_migrate_instance(
        cluster.ctxt, instance_uuid=uuid, host="compute-2"
    )
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 120
    while True:
        got = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=mig)
        if got["memory_processed"] is not None:
            seen.append((got["memory_processed"], got["progress"] or 0))
        if got["status"] in ("completed", "failed", "error", "cancelled"):
            break
        assert time.monotonic() < deadline, f"migration stuck: {got}"
        await asyncio.sleep(0.1)
    assert got["status"] == "completed", got
    assert got["memory_total"] and got["memory_total"] > 100 * 1024 * 1024  # from QEMU
    percents = [p for _, p in seen]
    assert percents == sorted(percents)
    (inst,) = await cluster.wait_instances([uuid], timeout=60)
    assert (inst.host, inst.vm_state) == ("compute-2", "active")
    dest_log = state / "qemu-compute-2" / uuid / SERIAL_LOG
    deadline = time.monotonic() + 15
    while "heartbeat" not in dest_log.read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    first = int(dest_log.read_text().split("heartbeat ", 1)[1].split()[0])
    assert first > before  # the counter continued: the same guest, never rebooted
    running = {h: set(g) for h, g in guest_processes(state).items()}
    assert running == {"compute-2": {uuid}}  # the source process is gone
    await cluster.tasks.delete_instance(cluster.ctxt, instance_uuid=uuid)
    await cluster.wait_instances([uuid], deleted=True, timeout=60)
    assert guest_processes(state) == {}


async def test_abort_and_force_complete_through_the_services(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    (uuid,) = await cluster.boot(
        flavor="small", name="vm", image_ref=IMAGE, forced_host="compute-1"
    )
    await cluster.wait_instances([uuid], timeout=180)
    tasks, ctxt = cluster.tasks, cluster.ctxt
    # 1 MB/s: the 128 MB guest would take minutes; abort it mid-way.
    mig = await tasks.live_migrate_instance(
        ctxt, instance_uuid=uuid, host="compute-2", bandwidth_limit_mb_s=1
    )
    await wait_copying(tasks, ctxt, mig)
    await tasks.live_migration_abort(ctxt, migration_uuid=mig)
    assert (await wait_migration(tasks, ctxt, mig))["status"] == "cancelled"
    (inst,) = await cluster.wait_instances([uuid], timeout=60)
    assert (inst.host, inst.vm_state) == ("compute-1", "active")
    deadline = time.monotonic() + 15
    while {h: set(g) for h, g in guest_processes(state).items()} != {"compute-1": {uuid}}:
        assert time.monotonic() < deadline, guest_processes(state)  # nothing on the dest
        await asyncio.sleep(0.1)
    log = state / "qemu-compute-1" / uuid / SERIAL_LOG
    size = log.stat().st_size
    deadline = time.monotonic() + 10
    while "heartbeat" not in log.read_text()[size:]:
        assert time.monotonic() < deadline, "the guest stopped on the source"
        await asyncio.sleep(0.1)

    # The same cap again, and force-complete: post-copy finishes it at once.
    mig = await tasks.live_migrate_instance(
        ctxt, instance_uuid=uuid, host="compute-2", bandwidth_limit_mb_s=1
    )
    await wait_copying(tasks, ctxt, mig)
    await tasks.live_migration_force_complete(ctxt, migration_uuid=mig)
    assert (await wait_migration(tasks, ctxt, mig))["status"] == "completed"
    (inst,) = await cluster.wait_instances([uuid], timeout=60)
    assert (inst.host, inst.vm_state) == ("compute-2", "active")
    assert {h: set(g) for h, g in guest_processes(state).items()} == {"compute-2": {uuid}}
    await tasks.delete_instance(ctxt, instance_uuid=uuid)
    await cluster.wait_instances([uuid], deleted=True, timeout=60)
