"""Agents SIGKILLed with real guests, idle or mid-migration (issue 18 d).

QEMU daemonizes, so its guests outlive a killed agent; the restarted agent re-attaches to their
monitors and settles what the kill interrupted with its peer. Each test ends with every
instance running in exactly one QEMU process, on the host the database names.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from compute_agent.virt.qemu import process
from compute_agent.virt.qemu.cmdline import QMP_TOOLS_SOCKET
from compute_agent.virt.qemu.qmp import QMPClient
from compute_agent.virt.qemu.testing import (
    first_heartbeat,
    guest_processes,
    last_heartbeat,
    serial_path,
    wait_copying,
    wait_disks,
    wait_migration,
    wait_new_heartbeat,
)
from shared_objects.objects.instance import InstanceList

pytestmark = [pytest.mark.qemu, pytest.mark.integration]

IMAGE = "fleet-busybox"


async def one_host_each(cluster: Any, state: Path, uuids: list[str]) -> dict[str, str]:
    """Every instance ACTIVE in exactly one QEMU process, on the host the database names;
    ``{uuid: host}``. Waits for stray copies to go (a settled migration removes them)."""
    deadline = time.monotonic() + 30
    while True:
        running: dict[str, list[str]] = {}
        for host, guests in guest_processes(state).items():
            for uuid in guests:
                running.setdefault(uuid, []).append(host)
        if all(len(running.get(u, ())) == 1 for u in uuids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    insts = await InstanceList.get_by_uuids(cluster.ctxt, uuids)
    db = {i.uuid: i.host for i in insts}
    assert {u: running.get(u) for u in uuids} == {u: [db[u]] for u in uuids}
    assert {(i.vm_state, i.task_state) for i in insts} == {("active", None)}
    return db


async def delete_all(cluster: Any, state: Path, uuids: list[str]) -> None:
    for uuid in uuids:
        await cluster.tasks.delete_instance(cluster.ctxt, instance_uuid=uuid)
    await cluster.wait_instances(uuids, deleted=True, timeout=60)
    assert guest_processes(state) == {}


async def boot_one(cluster: Any, host: str) -> str:
    (uuid,) = await cluster.boot(flavor="small", name="vm", image_ref=IMAGE, forced_host=host)
    (inst,) = await cluster.wait_instances([uuid], timeout=180)
    assert inst.vm_state == "active"
    return str(uuid)


async def slow_migration(cluster: Any, uuid: str, dest: str) -> str:
    """A migration capped at 1 MB/s (minutes for 128 MB), once QEMU reports copied bytes."""
    tasks, ctxt = cluster.tasks, cluster.ctxt
    mig = await tasks.live_migrate_instance(
        ctxt, instance_uuid=uuid, host=dest, bandwidth_limit_mb_s=1
    )
    await wait_copying(tasks, ctxt, mig)
    return str(mig)


async def test_a_killed_agent_finds_its_running_guests_again(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    uuids = await cluster.boot(
        flavor="small", name="vm", image_ref=IMAGE, forced_host="compute-1", count=2
    )
    await cluster.wait_instances(uuids, timeout=180)
    before = guest_processes(state)
    assert set(before["compute-1"]) == set(uuids)
    await cluster.kill_process("compute-1")  # SIGKILL: the guests are not its children
    assert guest_processes(state) == before
    await cluster.restart_agent("compute-1")
    await cluster.wait_instances(uuids, timeout=60)
    assert await one_host_each(cluster, state, uuids) == {u: "compute-1" for u in uuids}
    assert guest_processes(state) == before  # the same processes, re-attached
    # The restarted agent drives them: a hot-plug reaches the guest, a delete ends it.
    await cluster.tasks.attach_volume(
        cluster.ctxt, instance_uuid=uuids[0], volume_id="vol-r", device_name="/dev/vdb"
    )
    await wait_disks(serial_path(state, "compute-1", uuids[0]), "disks [vda]")
    await delete_all(cluster, state, uuids)


async def test_source_agent_killed_mid_copy_keeps_the_guest_on_the_source(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    uuid = await boot_one(cluster, "compute-1")
    mig = await slow_migration(cluster, uuid, "compute-2")
    source_pid = guest_processes(state)["compute-1"][uuid]
    await cluster.kill_process("compute-1")
    await cluster.restart_agent("compute-1")
    got = await wait_migration(cluster.tasks, cluster.ctxt, mig)
    assert got["status"] in ("error", "failed", "cancelled"), got
    await cluster.wait_instances([uuid], timeout=120)
    assert await one_host_each(cluster, state, [uuid]) == {uuid: "compute-1"}
    assert guest_processes(state)["compute-1"][uuid] == source_pid  # never restarted
    await wait_new_heartbeat(serial_path(state, "compute-1", uuid))  # and it runs
    await delete_all(cluster, state, [uuid])


async def test_destination_agent_killed_mid_copy_finishes_the_migration_after_restart(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    uuid = await boot_one(cluster, "compute-1")
    mig = await slow_migration(cluster, uuid, "compute-2")
    dest_pid = guest_processes(state)["compute-2"][uuid]
    await cluster.kill_process("compute-2")
    assert process.is_guest_process(dest_pid, uuid)  # the incoming QEMU keeps receiving
    await cluster.restart_agent("compute-2")
    before = last_heartbeat(serial_path(state, "compute-1", uuid))
    # The restarted destination must finish its half: resume the guest it re-attached to.
    await cluster.tasks.live_migration_force_complete(cluster.ctxt, migration_uuid=mig)
    got = await wait_migration(cluster.tasks, cluster.ctxt, mig)
    assert got["status"] == "completed", got
    await cluster.wait_instances([uuid], timeout=60)
    assert await one_host_each(cluster, state, [uuid]) == {uuid: "compute-2"}
    assert guest_processes(state)["compute-2"][uuid] == dest_pid
    dest_log = serial_path(state, "compute-2", uuid)
    await wait_new_heartbeat(dest_log)
    assert before is not None and (first_heartbeat(dest_log) or 0) > before  # never rebooted
    await delete_all(cluster, state, [uuid])


async def test_source_agent_killed_after_the_switch_over_hands_the_guest_to_the_destination(
    qemu_cluster: tuple[Any, Path],
) -> None:
    cluster, state = qemu_cluster
    uuid = await boot_one(cluster, "compute-1")
    mig = await slow_migration(cluster, uuid, "compute-2")
    dest_pid = guest_processes(state)["compute-2"][uuid]
    # Freeze the source agent, then let QEMU finish the copy without it: lift the cap through
    # the operators' monitor and wait for the switch-over. The agent dies before it notices.
    cluster.pause_process("compute-1")
    tools = await QMPClient.connect(state / "qemu-compute-1" / uuid / QMP_TOOLS_SOCKET)
    try:
        await tools.execute("migrate-set-parameters", {"max-bandwidth": 100 * 1024**3})
        deadline = time.monotonic() + 60
        while (await tools.execute("query-migrate")).get("status") != "completed":
            assert time.monotonic() < deadline, "QEMU did not complete the copy"
            await asyncio.sleep(0.1)
    finally:
        await tools.close()
    before = last_heartbeat(serial_path(state, "compute-1", uuid))
    await cluster.kill_process("compute-1")
    await cluster.restart_agent("compute-1")
    got = await wait_migration(cluster.tasks, cluster.ctxt, mig)
    assert got["status"] == "completed", got
    await cluster.wait_instances([uuid], timeout=60)
    assert await one_host_each(cluster, state, [uuid]) == {uuid: "compute-2"}
    assert guest_processes(state)["compute-2"][uuid] == dest_pid
    dest_log = serial_path(state, "compute-2", uuid)
    await wait_new_heartbeat(dest_log)
    assert before is not None and (first_heartbeat(dest_log) or 0) > before  # never rebooted
    await delete_all(cluster, state, [uuid])
