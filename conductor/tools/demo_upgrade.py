"""``make demo-upgrade``: a rolling upgrade from the previous release to this one, narrated.

1. A fleet on the previous release (its real code, exported from git): conductor + 2 agents.
2. Boot instances.
3. Migrate the database with the new release, upgrade the conductor: the compute RPC cap stays
   at the old release because both agents are old.
4. Upgrade one agent; live-migrate old → new and new → old across the releases.
5. Upgrade the last agent and SIGHUP the conductor: the cap lifts to the new release.

Broker logins: the old agents keep ONE shared login (``fleet-shared-<tag>``), as deployments of
the old release did; conductors log in as ``fleet-conductor-<tag>-1`` from the start and the
demo as ``fleet-operator-<tag>``. Processes on the new code are told that the shared login
speaks for the hosts still on the old release (``FLEET_SECURITY__LEGACY_SHARED_LOGIN`` /
``FLEET_SECURITY__LEGACY_HOSTS``); an upgraded agent logs in as its own
``fleet-host-<tag>-<host>``. The tag is new for every run and every login is deleted at the end
(``conductor.tools.demo.demo_broker``): two demos at once, or a killed one, never collide.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from conductor.tools.cluster import ClusterSpec, LocalCluster
from conductor.tools.demo import demo_broker, demo_database, print_fleet, say, vhost_url
from conductor.tools.release_tree import export_release, previous_release
from shared_objects import releases
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance
from shared_objects.runtime.log import configure_logging

HOSTS = ("compute-1", "compute-2")


def shared_login(tag: str) -> str:
    """The one login the old release's agents share (what a deployment of that release had),
    named after this run's tag."""
    return f"fleet-shared-{tag}"


def conductor_caps(cluster: LocalCluster) -> list[str]:
    """The compute RPC caps the conductor logged, oldest first."""
    caps = []
    path = cluster.workdir / "conductor-1.log"
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "compute_rpc_version_cap":
            caps.append(f"{event.get('cap')} (release {event.get('release')})")
    return caps


async def migrate(cluster: LocalCluster, uuid: str, host: str) -> str:
    assert cluster.tasks is not None
    migration_uuid = await cluster.tasks.live_migrate_instance(
        cluster.ctxt, instance_uuid=uuid, host=host
    )
    for _ in range(600):
        migration = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=migration_uuid)
        if migration["status"] in ("completed", "failed", "error", "cancelled"):
            return str(migration["status"])
        await asyncio.sleep(0.1)
    return "timeout"


async def demo(workdir: Path) -> int:
    started = time.monotonic()
    old = previous_release()
    new = releases.CURRENT
    say(f"rolling upgrade from release {old.name} (commit {str(old.commit)[:10]}) to {new.name}")
    with tempfile.TemporaryDirectory(prefix=f"fleet-release-{old.name}-") as tmp:
        tree = await export_release(old, Path(tmp))
        say(f"exported release {old.name}'s code from git history to {tree}")
        async with demo_broker() as (vhost, logins), demo_database() as (db_name, db_url):
            say(f"created a fresh PostgreSQL database {db_name!r} and RabbitMQ vhost {vhost}")
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
            spec = ClusterSpec(
                database_url=db_url,
                transport_url=vhost_url(vhost),
                control_exchange="fleet",
                hosts=HOSTS,
                workdir=workdir,
                conductor_source=tree,
                agent_source={h: tree for h in HOSTS},
                common_env={
                    "FLEET_COMPUTE__SPAWN_DELAY": "0.2",
                    "FLEET_UPGRADE_LEVELS__REFRESH_INTERVAL": "1",
                },
                service_down_time=6.0,
                report_interval=1.0,
                logins=logins,
                legacy_shared_login=shared_login(logins.tag) if logins is not None else None,
            )
            cluster = LocalCluster(spec)
            say(f"step 1: a fleet on release {old.name}: conductor-1, {', '.join(HOSTS)}")
            await cluster.start()
            if logins is not None:
                say(
                    f"        broker logins: conductor-1 as {cluster.login_of('conductor-1')}, "
                    f"both old agents share {cluster.login_of(HOSTS[0])!r}"
                )
            try:
                status = await _steps(cluster, tree, old, new)
            finally:
                say("stopping every process (SIGTERM, drain)")
                codes = await cluster.stop()
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        say(f"FAILED: unclean exits {bad}")
        return 1
    if status == 0:
        say(f"done in {time.monotonic() - started:.1f}s; every process exited 0")
    return status


async def _steps(
    cluster: LocalCluster,
    tree: Path,
    old: releases.Release,
    new: releases.Release,
) -> int:
    assert cluster.tasks is not None
    await Flavor(
        cluster.ctxt, name="m1.small", flavorid="m1.small", vcpus=1, memory_mb=512, root_gb=5
    ).create()
    say("step 2: booting one instance on each host")
    uuids: dict[str, str] = {}
    for host in HOSTS:
        (uuids[host],) = await cluster.boot(flavor="m1.small", name=f"vm-{host}", forced_host=host)
    await cluster.wait_instances(list(uuids.values()))
    say(f"step 3: database migrated by release {new.name}, conductor upgraded")
    await cluster.migrate_database(None)
    await cluster.switch_conductor_code(None)
    await asyncio.sleep(1.5)
    say(f"        conductor's compute RPC cap: {conductor_caps(cluster)[-1]}")
    say(f"step 4: compute-1 upgraded to release {new.name}; compute-2 still on {old.name}")
    await cluster.switch_agent_code("compute-1", None)
    if cluster.spec.logins is not None:
        say(f"        compute-1 now logs in as {cluster.login_of('compute-1')}")
    await asyncio.sleep(1.5)
    say(f"        cap while compute-2 is old: {conductor_caps(cluster)[-1]}")
    for uuid, dest, label in (
        (uuids["compute-2"], "compute-1", f"old ({old.name}) -> new ({new.name})"),
        (uuids["compute-1"], "compute-2", f"new ({new.name}) -> old ({old.name})"),
    ):
        status = await migrate(cluster, uuid, dest)
        host = (await Instance.get_by_uuid(cluster.ctxt, uuid)).host
        say(f"        live migration {label}: {status}, instance now on {host}")
        if status != "completed":
            return 1
    say("step 5: compute-2 upgraded; SIGHUP to the conductor")
    await cluster.switch_agent_code("compute-2", None)
    conductor = cluster.processes["conductor-1"].process
    assert conductor is not None
    os.kill(conductor.pid, signal.SIGHUP)
    lifted = False
    for _ in range(50):
        await asyncio.sleep(0.2)
        if conductor_caps(cluster)[-1].startswith(new.compute_rpc_api):
            lifted = True
            break
    say(f"        cap after the upgrade: {conductor_caps(cluster)[-1]}")
    await print_fleet(cluster)
    if not lifted:
        say("FAILED: the cap did not lift")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-demo-upgrade", description=__doc__)
    parser.add_argument("--workdir", default="var/demo-upgrade", type=Path)
    args = parser.parse_args(argv)
    configure_logging("console", "warning", stream=sys.stderr)
    return asyncio.run(demo(args.workdir))


if __name__ == "__main__":
    sys.exit(main())
