"""``make demo-vm``: the demo with real guests (QEMU, docs/virt.md), narrated.

A conductor and two compute agents whose ``[compute] driver`` is ``qemu``, as separate processes
on the local RabbitMQ (its own vhost) and PostgreSQL (its own database). Boots one guest on each
host, hot-plugs a volume into one and unplugs it again — printing the guest's own serial console
lines that show the disk appear and go — live-migrates it to the other host with the progress
bar fed by QEMU's ``query-migrate``, and shows its heartbeat counter going on on the destination
(the same guest, never rebooted). Exit status 0 means every step worked.

Needs QEMU and the guest image (``make guest-image``); TCG unless ``--accel`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

from compute_agent.virt.qemu.image import DEFAULT_IMAGE, DEFAULT_IMAGE_DIR
from compute_agent.virt.qemu.testing import (
    cluster_env,
    first_heartbeat,
    guest_processes,
    last_heartbeat,
    reap_guests,
    serial_path,
    wait_disks,
    wait_new_heartbeat,
)
from conductor.tools.cluster import ClusterSpec, LocalCluster
from conductor.tools.demo import demo_broker, demo_database, follow_migration, print_fleet, say
from shared_objects.objects.flavor import Flavor
from shared_objects.runtime.log import configure_logging
from shared_objects.testing.isolation import vhost_url

FLAVOR = "m1.tiny"
#: Cap of the demo's migration (MB/s): a 128 MB guest then takes a few seconds, long enough to
#: watch the bar move; uncapped it is over in about half a second.
DEMO_BANDWIDTH_MB_S = 32


def guest_lines(path: Path, start: int = 0, *, heartbeats: bool = False) -> list[str]:
    """The guest's own console lines (``fleet-guest: …``) after byte ``start`` of its log."""
    try:
        text = path.read_bytes()[start:].decode(errors="replace")
    except FileNotFoundError:
        return []
    lines = [line.strip() for line in text.splitlines() if "fleet-guest:" in line]
    return [line for line in lines if heartbeats or " heartbeat " not in line]


async def follow_heartbeats(path: Path) -> int | None:
    """The last heartbeat seen in ``path`` until the file goes (the source's guest directory is
    removed once the migration completed) or the task is cancelled."""
    seen = last_heartbeat(path)
    try:
        while await asyncio.to_thread(path.exists):
            seen = last_heartbeat(path) or seen
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        seen = last_heartbeat(path) or seen  # what it printed last, if the log is still there
    return seen


def show(lines: list[str]) -> None:
    for line in lines:
        print(f"    | {line}", flush=True)


async def demo(workdir: Path, image_dir: Path, accel: str) -> int:
    started = time.monotonic()
    state = workdir / "hypervisors"
    async with demo_broker() as (vhost, logins), demo_database() as (db_name, db_url):
        say(f"created a fresh PostgreSQL database {db_name!r} and RabbitMQ vhost {vhost}")
        spec = ClusterSpec(
            database_url=db_url,
            transport_url=vhost_url(vhost),
            control_exchange="fleet",
            hosts=("compute-1", "compute-2"),
            workdir=workdir,
            common_env=cluster_env(image_dir, accel),
            logins=logins,
        )
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
        cluster = LocalCluster(spec)
        say(f"starting conductor-1, compute-1 and compute-2 (driver qemu, accel {accel})")
        await cluster.start()
        try:
            return await narrate(cluster, state, started)
        finally:
            say("stopping every process (SIGTERM, drain)")
            await cluster.stop()
            # Guests outlive their agents by design; the demo leaves none behind.
            left = await asyncio.to_thread(reap_guests, state)
            if left:
                say(f"killed {left} QEMU process(es) left running")


async def narrate(cluster: LocalCluster, state: Path, started: float) -> int:
    tasks, ctxt = cluster.tasks, cluster.ctxt
    assert tasks is not None
    say(f"cluster up; logs and guest directories in {cluster.workdir}/")
    await Flavor(ctxt, name=FLAVOR, flavorid=FLAVOR, vcpus=1, memory_mb=128, root_gb=1).create()
    say(f"booting vm-1 on compute-1 and vm-2 on compute-2 (image {DEFAULT_IMAGE})")
    uuids: dict[str, str] = {}
    for n, host in ((1, "compute-1"), (2, "compute-2")):
        (uuids[f"vm-{n}"],) = await cluster.boot(
            flavor=FLAVOR, name=f"vm-{n}", image_ref=DEFAULT_IMAGE, forced_host=host
        )
    insts = await cluster.wait_instances(list(uuids.values()), timeout=240)
    if {i.vm_state for i in insts} != {"active"}:
        say(f"FAILED: {[(i.name, i.vm_state) for i in insts]}")
        return 1
    took = time.monotonic() - started
    say(f"both ACTIVE after {took:.1f}s; QEMU processes: {guest_processes(state)}")
    uuid = uuids["vm-1"]
    log = serial_path(state, "compute-1", uuid)
    say("vm-1's console so far:")
    show(guest_lines(log)[-3:])

    say("attaching volume vol-demo to vm-1 as /dev/vdb (blockdev-add + device_add)")
    mark = log.stat().st_size
    await tasks.attach_volume(
        ctxt, instance_uuid=uuid, volume_id="vol-demo", device_name="/dev/vdb"
    )
    await wait_disks(log, "disks [vda]")
    say("the guest saw it:")
    show(guest_lines(log, mark))
    say("detaching it (device_del, the guest releases it: DEVICE_DELETED, blockdev-del)")
    mark = log.stat().st_size
    await tasks.detach_volume(ctxt, instance_uuid=uuid, volume_id="vol-demo")
    await wait_disks(log, "disks []")
    say("the guest saw it go:")
    show(guest_lines(log, mark))

    before = await wait_new_heartbeat(log)
    say(f"vm-1 on compute-1 is at heartbeat {before}")
    say(f"live-migrating vm-1 to compute-2 (QEMU over tcp:127.0.0.1, {DEMO_BANDWIDTH_MB_S} MB/s)")
    on_source = asyncio.create_task(follow_heartbeats(log))
    migration_uuid = await tasks.live_migrate_instance(
        ctxt, instance_uuid=uuid, host="compute-2", bandwidth_limit_mb_s=DEMO_BANDWIDTH_MB_S
    )
    final = await follow_migration(cluster, migration_uuid)
    if final["status"] != "completed":
        on_source.cancel()
        say(f"FAILED: migration ended {final['status']}")
        return 1
    on_source.cancel()  # completed: the source switched over, its last heartbeat is written
    last_on_source = await on_source
    dest_log = serial_path(state, "compute-2", uuid)
    await wait_new_heartbeat(dest_log)
    await wait_new_heartbeat(dest_log)
    first = first_heartbeat(dest_log)
    say(
        f"migration {migration_uuid} completed: the source printed up to heartbeat "
        f"{last_on_source}, the destination goes on from {first}:"
    )
    show(guest_lines(dest_log, heartbeats=True)[:3])
    if "init ready" in dest_log.read_text(errors="replace") or not (first or 0) > (before or 0):
        say("FAILED: the guest booted again on the destination")
        return 1
    say("no boot lines on the destination: the same guest kept running across the move")
    say(f"QEMU processes now: {guest_processes(state)}")
    say("the fleet:")
    await print_fleet(cluster)
    say("deleting both instances (their QEMU processes end)")
    for value in uuids.values():
        await tasks.delete_instance(ctxt, instance_uuid=value)
    await cluster.wait_instances(list(uuids.values()), deleted=True, timeout=60)
    if guest_processes(state):
        say(f"FAILED: QEMU processes left: {guest_processes(state)}")
        return 1
    say(f"done in {time.monotonic() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-demo-vm", description=__doc__)
    parser.add_argument("--workdir", default="var/demo-vm", type=Path)
    parser.add_argument(
        "--image-dir",
        type=Path,
        default=Path(os.environ.get("FLEET_COMPUTE__QEMU_IMAGE_DIR") or DEFAULT_IMAGE_DIR),
    )
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm:tcg", "kvm"))
    args = parser.parse_args(argv)
    configure_logging("console", "warning", stream=sys.stderr)
    # Absolute: the agents run with their own working directory.
    workdir, image_dir = args.workdir.resolve(), args.image_dir.expanduser().resolve()
    return asyncio.run(demo(workdir, image_dir, args.accel))


if __name__ == "__main__":
    sys.exit(main())
