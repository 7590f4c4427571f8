"""``make demo``: a local Fleet on this machine, narrated.

Starts a conductor and two compute agents as separate processes on the local RabbitMQ (its own
vhost) and PostgreSQL (its own database), boots six instances, attaches and detaches a volume,
live-migrates one with a progress bar, prints the fleet, and stops everything cleanly. Exit
status 0 means every step worked.

Each process logs in to RabbitMQ as its own user, as in a deployment: ``fleet-conductor-<tag>-1``,
``fleet-host-<tag>-compute-1``, ``fleet-host-<tag>-compute-2``, and the demo itself as
``fleet-operator-<tag>`` (see ``docs/operations.md``). The tag is new for every run, like the
vhost and the database: broker users are global to the broker, so two demos at once, or a demo
beside a cluster of the documented names, never share a login nor delete each other's; the
demo deletes its own at the end, and a demo that was killed leaves users no other run uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from conductor.tools.cluster import ClusterSpec, LocalCluster
from conductor.tools.fleetctl._output import object_dict, render_table
from conductor.tools.fleetctl.migrations import FINAL, ProgressBar
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import InstanceList
from shared_objects.runtime.log import configure_logging
from shared_objects.testing import isolation
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import private_vhost, vhost_url

INSTANCE_COLUMNS = ("name", "uuid", "host", "vm_state", "task_state", "power_state")
HOST_COLUMNS = ("host", "running_vms", "vcpus_used", "memory_mb_used", "memory_mb")


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


@contextlib.asynccontextmanager
async def demo_broker() -> AsyncIterator[tuple[str, BrokerLogins | None]]:
    """A private vhost and the broker logins of the demo's processes on it (tagged with a tag
    of this run's own: unique names), both deleted at the end. Without rabbitmqctl: vhost ``/``
    and no logins (every process then uses the guest URL)."""
    with private_vhost("fleet-demo") as name:
        vhost = name or "/"
        if vhost == "/":
            yield vhost, None
            return
        logins = BrokerLogins(vhost_url(vhost), vhost, tag=uuid.uuid4().hex[:8])
        try:
            yield vhost, logins
        finally:
            await logins.delete()


def describe_logins(cluster: LocalCluster) -> str:
    names = [name for name in cluster.processes if cluster.login_of(name)]
    pairs = [f"{name} as {cluster.login_of(name)}" for name in names]
    return ", ".join([*pairs, f"this demo as {cluster.operator_login}"])


@contextlib.asynccontextmanager
async def demo_database() -> AsyncIterator[tuple[str, str]]:
    """A database of the demo's own (a unique name: two demos, or a demo beside a cluster, never
    share or drop each other's), dropped at the end. Yields (name, URL)."""
    async with isolation.fresh_database("fleet_demo") as url:
        yield url.rpartition("/")[2], url


async def print_fleet(cluster: LocalCluster) -> None:
    insts = sorted(await InstanceList.get_all(cluster.ctxt), key=lambda i: i.name or "")
    print(render_table([object_dict(i, INSTANCE_COLUMNS) for i in insts], INSTANCE_COLUMNS))
    nodes = sorted(await ComputeNodeList.get_all(cluster.ctxt), key=lambda n: n.host)
    print(render_table([object_dict(n, HOST_COLUMNS) for n in nodes], HOST_COLUMNS))


async def follow_migration(cluster: LocalCluster, migration_uuid: str) -> dict[str, Any]:
    """Poll the Migration, drawing the same progress bar as ``fleetctl live-migrate --wait``."""
    assert cluster.tasks is not None
    bar = ProgressBar(sys.stdout, prefix="    ")
    try:
        for _ in range(1500):
            migration = await cluster.tasks.get_migration(
                cluster.ctxt, migration_uuid=migration_uuid
            )
            bar.update(migration)
            if migration["status"] in FINAL:
                return migration
            await asyncio.sleep(0.1)
        return migration
    finally:
        bar.close()


async def demo(workdir: Path) -> int:
    started = time.monotonic()
    async with demo_broker() as (vhost, logins), demo_database() as (db_name, db_url):
        say(f"created a fresh PostgreSQL database {db_name!r} and RabbitMQ vhost {vhost}")
        spec = ClusterSpec(
            database_url=db_url,
            transport_url=vhost_url(vhost),
            control_exchange="fleet",
            hosts=("compute-1", "compute-2"),
            workdir=workdir,
            common_env={"FLEET_COMPUTE__SPAWN_DELAY": "0.3"},
            logins=logins,
        )
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
        cluster = LocalCluster(spec)
        say("migrating the database, starting conductor-1, compute-1 and compute-2")
        await cluster.start()
        try:
            say(f"cluster up; logs in {workdir}/")
            if logins is not None:
                say(f"RabbitMQ logins (one per process): {describe_logins(cluster)}")
            await Flavor(
                cluster.ctxt,
                name="m1.small",
                flavorid="m1.small",
                vcpus=1,
                memory_mb=512,
                root_gb=5,
            ).create()
            say("booting 6 instances of flavor m1.small")
            uuids = await cluster.boot(flavor="m1.small", name="web", count=6)
            insts = await cluster.wait_instances(uuids, timeout=120)
            states = {i.vm_state for i in insts}
            hosts = sorted({str(i.host) for i in insts})
            say(f"all 6 settled: {sorted(map(str, states))} on {hosts}")
            if states != {"active"} or len(hosts) < 2:
                say("FAILED: expected six ACTIVE instances over both hosts")
                return 1
            target = insts[0]
            assert cluster.tasks is not None
            say(f"attaching volume vol-demo to {target.name} ({target.uuid})")
            await cluster.tasks.attach_volume(
                cluster.ctxt,
                instance_uuid=target.uuid,
                volume_id="vol-demo",
                device_name="/dev/vdb",
            )
            say("detaching it again")
            await cluster.tasks.detach_volume(
                cluster.ctxt, instance_uuid=target.uuid, volume_id="vol-demo"
            )
            moving = next(i for i in insts if i.host == "compute-1")
            say(f"live-migrating {moving.name} from compute-1 to compute-2")
            migration_uuid = await cluster.tasks.live_migrate_instance(
                cluster.ctxt, instance_uuid=moving.uuid, host="compute-2"
            )
            final = await follow_migration(cluster, migration_uuid)
            if final["status"] != "completed":
                say(f"FAILED: migration ended {final['status']}")
                return 1
            say(f"migration {migration_uuid} completed")
            say("the fleet:")
            await print_fleet(cluster)
        finally:
            say("stopping every process (SIGTERM, drain)")
            codes = await cluster.stop()
        bad = {name: code for name, code in codes.items() if code != 0}
        if bad:
            say(f"FAILED: unclean exits {bad}")
            return 1
    say(f"done in {time.monotonic() - started:.1f}s; every process exited 0")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-demo", description=__doc__)
    parser.add_argument("--workdir", default="var/demo", type=Path)
    args = parser.parse_args(argv)
    configure_logging("console", "warning", stream=sys.stderr)
    return asyncio.run(demo(args.workdir))


if __name__ == "__main__":
    sys.exit(main())
