"""Every ``fleetctl`` verb, run as the real command against one real cluster (shared by the
module: a conductor and two agents as processes, a fresh PostgreSQL database).

Usage errors and environment failures are in ``test_fleetctl_errors.py``; here: what each verb
prints and changes, name-or-UUID lookup, formats and columns, the reasons printed by ``boot
--wait`` and ``live-migrate --wait`` when they fail, and that a host's login may not do what
only operators may.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import yaml

from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor, FlavorList
from shared_objects.objects.service import Service
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.rabbit_node import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

AMQP_URL = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
PG_ADMIN_DSN = os.environ.get(
    "FLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class Fleet:
    """The module's cluster and a way to run ``fleetctl`` against it."""

    def __init__(self, cluster: LocalCluster, failures: dict[str, Path]) -> None:
        self.cluster = cluster
        self.failures = failures  # each agent's FLEET_COMPUTE__FAILURES_FILE

    async def run(self, *argv: str, login: str | None = None, **extra: str) -> tuple[int, str, str]:
        env = self.cluster._base_env(login or self.cluster.operator_login)
        env.update(extra)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conductor.tools.fleetctl",
            "--timeout",
            "20",
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *argv: str) -> str:
        code, out, err = await self.run(*argv)
        assert code == 0, (argv, code, err)
        assert err == "", err
        return out

    async def json(self, *argv: str) -> object:
        return json.loads(await self.ok(*argv, "-f", "json"))

    def inject(self, spec: str, *hosts: str) -> None:
        """Make the fake hypervisor of ``hosts`` (default: all) fail as ``spec`` says."""
        for host in hosts or tuple(self.failures):
            self.failures[host].write_text(spec)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    amqp_vhost: str, broker_logins: BrokerLogins | None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    workdir = tmp_path_factory.mktemp("fleetctl")
    failures = {h: workdir / f"{h}.failures" for h in ("compute-1", "compute-2")}
    for path in failures.values():
        path.write_text("")
    amqp = AMQP_URL if not amqp_vhost else AMQP_URL.rstrip("/") + "/" + amqp_vhost
    spec = ClusterSpec(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}",
        transport_url=amqp,
        control_exchange=f"fleet-test-{uuid.uuid4().hex[:12]}",
        workdir=workdir / "cluster",
        common_env={"FLEET_COMPUTE__SPAWN_DELAY": "0.05"},
        agent_env={h: {"FLEET_COMPUTE__FAILURES_FILE": str(p)} for h, p in failures.items()},
        logins=broker_logins,
    )
    cluster = LocalCluster(spec)
    try:
        await cluster.start()
        await Flavor(
            cluster.ctxt, name="small", flavorid="small", vcpus=1, memory_mb=512, root_gb=1
        ).create()
        yield Fleet(cluster, failures)
    finally:
        codes = await cluster.stop()
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    assert all(c in (0, None, -9) for c in codes.values()), codes


async def test_version_is_the_package_metadata_version() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conductor.tools.fleetctl",
        "--version",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().strip() == f"fleetctl {metadata.version('fleet')}"


async def test_boot_wait_show_by_name_list_columns_and_formats(fleet: Fleet) -> None:
    rows = await fleet.json("boot", "--flavor", "small", "--name", "web-1", "--wait")
    assert isinstance(rows, list) and [r["vm_state"] for r in rows] == ["active"]
    uuid_ = rows[0]["uuid"]
    # --format after the verb, lookup by name; the same record by UUID.
    shown = await fleet.json("show", "web-1")
    assert isinstance(shown, dict) and shown["uuid"] == uuid_
    assert await fleet.json("show", uuid_) == shown
    # -c and every format.
    assert (await fleet.ok("list", "-f", "value", "-c", "uuid", "-c", "name")).split("\n").count(
        f"{uuid_} web-1"
    ) == 1
    listed = yaml.safe_load(await fleet.ok("-f", "yaml", "list", "-c", "name"))
    assert {"name": "web-1"} in listed
    table = await fleet.ok("list")
    assert "| uuid" in table and "web-1" in table
    assert (await fleet.ok("show", "web-1", "-f", "value", "-c", "vm_state")).strip() == "active"
    # An unknown column is a usage error.
    code, out, err = await fleet.run("list", "-c", "nope")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "columns:" in err


async def test_ambiguous_and_unknown_names_are_clear_errors(fleet: Fleet) -> None:
    rows = [
        *await fleet.json("boot", "--flavor", "small", "--name", "twin"),  # type: ignore[misc]
        *await fleet.json("boot", "--flavor", "small", "--name", "twin"),  # type: ignore[misc]
    ]
    await fleet.cluster.wait_instances([r["uuid"] for r in rows])
    code, _, err = await fleet.run("show", "twin")
    assert code == 1 and len(err.splitlines()) == 1
    assert "2 instances are named 'twin'" in err
    assert all(r["uuid"] in err for r in rows)
    code, _, err = await fleet.run("show", "nobody")
    assert code == 1 and err.strip() == "fleetctl: no instance named 'nobody'"
    for r in rows:
        await fleet.ok("delete", r["uuid"], "--wait")


async def test_boot_wait_prints_the_fault_and_action_show_has_events_and_faults(
    fleet: Fleet,
) -> None:
    fleet.inject("spawn:*")
    try:
        code, out, err = await fleet.run(
            "boot", "--flavor", "small", "--name", "doomed", "--host", "compute-2", "--wait"
        )
    finally:
        fleet.inject("")
    assert code == 1, err
    assert "error" in out
    (line,) = err.splitlines()
    assert line.startswith("fleetctl: instance doomed (") and "ended in ERROR: " in line
    actions = await fleet.json("action", "list", "doomed")
    assert isinstance(actions, list) and [a["action"] for a in actions] == ["create"]
    shown = await fleet.json("action", "show", "doomed", actions[0]["request_id"])
    assert isinstance(shown, dict)
    assert any(e["result"] == "Error" for e in shown["events"]), shown
    assert shown["faults"], shown
    text = await fleet.ok("action", "show", "doomed", actions[0]["request_id"])
    assert "events:" in text and "faults:" in text


async def test_live_migrate_wait_completes_and_a_failure_prints_its_reason(fleet: Fleet) -> None:
    rows = await fleet.json(
        "boot", "--flavor", "small", "--name", "mover", "--host", "compute-1", "--wait"
    )
    assert isinstance(rows, list)
    fleet.inject("pre_live_migration:*", "compute-2")
    try:
        code, _, err = await fleet.run(
            "live-migrate", "mover", "--host", "compute-2", "--wait", "-f", "json"
        )
    finally:
        fleet.inject("")
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith("fleetctl: live migration ") and "no fault recorded" not in line, line
    final = await fleet.json("live-migrate", "mover", "--host", "compute-2", "--wait")
    assert isinstance(final, dict) and final["status"] == "completed"
    listed = await fleet.json("migrations", "--instance", "mover")
    assert isinstance(listed, list) and len(listed) == 2


async def test_a_broken_environment_changes_nothing(fleet: Fleet) -> None:
    """The cluster is there, but fleetctl cannot reach it: one line, documented status, and
    the flavor it asked for does not exist."""
    url = fleet.cluster._url_of(fleet.cluster.operator_login)
    scheme, _, rest = url.partition("://")
    creds, _, where = rest.rpartition("@")
    user = creds.partition(":")[0]
    hostport, _, vhost = where.partition("/")
    dead = f"{hostport.rsplit(':', 1)[0]}:{free_port()}"
    cases = [
        ({"FLEET_TRANSPORT_URL": f"{scheme}://{creds}@{dead}/{vhost}"}, 3),
        ({"FLEET_TRANSPORT_URL": f"{scheme}://{user}:wrong@{hostport}/{vhost}"}, 3),
        ({"FLEET_TRANSPORT_URL": f"{scheme}://{creds}@{hostport}/missing-{vhost}"}, 3),
        ({"FLEET_CONTROL_EXCHANGE": f"fleet-test-{uuid.uuid4().hex[:12]}"}, 4),
    ]
    for env, status in cases:
        code, out, err = await fleet.run(
            "--timeout",
            "2",
            "flavor",
            "create",
            "ghost",
            "--vcpus",
            "1",
            "--ram",
            "1",
            "--disk",
            "1",
            **env,
        )
        assert (code, out) == (status, ""), (env, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "ghost" not in {f.name for f in await FlavorList.get_all(fleet.cluster.ctxt)}


async def _migration_status(fleet: Fleet, instance: str, migration: str) -> str:
    listed = await fleet.json("migrations", "--instance", instance)
    assert isinstance(listed, list)
    (found,) = [m for m in listed if m["uuid"] == migration]
    return str(found["status"])


async def _until_status(fleet: Fleet, instance: str, migration: str, wanted: set[str]) -> str:
    for _ in range(120):
        status = await _migration_status(fleet, instance, migration)
        if status in wanted:
            return status
        await asyncio.sleep(0.25)
    raise AssertionError(f"migration {migration} still {status}, wanted {wanted}")


async def test_live_migration_abort_and_force_complete(fleet: Fleet) -> None:
    await fleet.json("boot", "--flavor", "small", "--name", "slow", "--host", "compute-1", "--wait")
    # Slow copy rounds on the source keep the migration running long enough to act on it.
    fleet.inject("live_migration_copy:*:delay=0.5", "compute-1")
    try:
        started = await fleet.json("live-migrate", "slow", "--host", "compute-2")
        assert isinstance(started, dict)
        first = started["migration_uuid"]
        await _until_status(fleet, "slow", first, {"running"})
        out = await fleet.ok("live-migration", "abort", first, "--reason", "change window over")
        assert out.strip() == f"abort requested for migration {first}"
        assert await _until_status(fleet, "slow", first, {"cancelled"}) == "cancelled"
        again = await fleet.json("live-migrate", "slow", "--host", "compute-2")
        assert isinstance(again, dict)
        second = again["migration_uuid"]
        await _until_status(fleet, "slow", second, {"running"})
        await fleet.ok("live-migration", "force-complete", second)
        assert await _until_status(fleet, "slow", second, {"completed"}) == "completed"
    finally:
        fleet.inject("")
    # Finished: a second abort is refused, in one line.
    code, _, err = await fleet.run("live-migration", "abort", second)
    assert code == 1 and len(err.splitlines()) == 1 and "already completed" in err, err


async def test_volume_attach_detach_and_secgroup_rule_delete(fleet: Fleet) -> None:
    await fleet.json("boot", "--flavor", "small", "--name", "disky", "--wait")
    attached = await fleet.json("volume", "attach", "disky", "vol-1", "--device", "/dev/vdb")
    assert isinstance(attached, dict)
    detached = await fleet.json("volume", "detach", "disky", "vol-1")
    assert detached == {
        "instance_uuid": (await fleet.json("show", "disky"))["uuid"],  # type: ignore[index]
        "volume_id": "vol-1",
        "detached": True,
    }
    await fleet.ok("secgroup", "create", "rules-only")
    await fleet.ok(
        "secgroup",
        "rule-add",
        "rules-only",
        "--protocol",
        "udp",
        "--from-port",
        "53",
        "--to-port",
        "53",
    )
    groups = await fleet.json("secgroup", "list")
    assert isinstance(groups, list)
    (group,) = [g for g in groups if g["name"] == "rules-only"]
    (rule,) = group["rules"]
    await fleet.ok("secgroup", "rule-delete", str(rule["id"]))
    groups = await fleet.json("secgroup", "list")
    assert isinstance(groups, list)
    assert [g["rules"] for g in groups if g["name"] == "rules-only"] == [[]]


async def test_flavor_create_list_delete(fleet: Fleet) -> None:
    out = await fleet.json("flavor", "create", "tiny", "--vcpus", "1", "--ram", "64", "--disk", "0")
    assert isinstance(out, dict) and out["flavorid"] == "tiny"
    assert "tiny" in await fleet.ok("flavor", "list", "-f", "value", "-c", "name")
    assert (await fleet.ok("flavor", "delete", "tiny")).strip() == "flavor tiny (tiny) deleted"
    names = [f.name for f in await FlavorList.get_all(fleet.cluster.ctxt)]
    assert "tiny" not in names
    code, _, err = await fleet.run("flavor", "delete", "tiny")
    assert code == 1 and "no flavor with id or name 'tiny'" in err


async def test_secgroup_create_list_delete_refuses_a_group_in_use(fleet: Fleet) -> None:
    await fleet.ok("secgroup", "create", "web")
    await fleet.ok("secgroup", "create", "unused")
    await fleet.ok(
        "secgroup", "rule-add", "web", "--protocol", "tcp", "--from-port", "80", "--to-port", "80"
    )
    rows = await fleet.json(
        "boot", "--flavor", "small", "--name", "guarded", "--security-group", "web", "--wait"
    )
    assert isinstance(rows, list)
    code, _, err = await fleet.run("secgroup", "delete", "web")
    assert code == 1 and "used by 1 instance(s)" in err and len(err.splitlines()) == 1
    await fleet.ok("secgroup", "delete", "unused")
    names = (await fleet.ok("secgroup", "list", "-f", "value", "-c", "name")).split()
    assert "web" in names and "unused" not in names


async def test_service_disable_keeps_new_instances_off_the_host_then_enable_and_delete(
    fleet: Fleet,
) -> None:
    listed = await fleet.json("service", "list")
    assert isinstance(listed, list)
    assert {(r["host"], r["state"]) for r in listed if r["binary"] == "fleet-compute"} == {
        ("compute-1", "up"),
        ("compute-2", "up"),
    }
    await fleet.ok("service", "disable", "compute-2", "--reason", "maintenance")
    svc = await Service.get_by_host_and_binary(fleet.cluster.ctxt, "compute-2", "fleet-compute")
    assert svc.disabled and svc.disabled_reason == "maintenance"
    # The host view refreshes within a second; everything new then lands on compute-1.
    await asyncio.sleep(1.5)
    rows = await fleet.json("boot", "--flavor", "small", "--name", "spread", "--count", "4")
    assert isinstance(rows, list)
    insts = await fleet.cluster.wait_instances([r["uuid"] for r in rows])
    assert {i.host for i in insts} == {"compute-1"}
    await fleet.ok("service", "enable", "compute-2")
    svc = await Service.get_by_host_and_binary(fleet.cluster.ctxt, "compute-2", "fleet-compute")
    assert not svc.disabled and svc.disabled_reason is None
    # A service that is up cannot be deleted; one that is down can.
    code, _, err = await fleet.run("service", "delete", "compute-2")
    assert code == 1 and "is up: stop it first" in err
    await Service(fleet.cluster.ctxt, host="old-host", binary="fleet-compute", version=1).create()
    await fleet.ok("service", "delete", "old-host")
    hosts = await fleet.json("services")
    assert isinstance(hosts, list) and "old-host" not in {r["host"] for r in hosts}
    assert "compute-1" in await fleet.ok("hosts", "-f", "value", "-c", "host")


async def test_a_host_login_may_not_disable_services_or_delete_flavors(fleet: Fleet) -> None:
    cluster = fleet.cluster
    if cluster.spec.logins is None:
        pytest.skip("needs per-process broker logins (rabbitmqctl)")
    host_login = cluster.login_of("compute-1")
    await Service(cluster.ctxt, host="gone", binary="fleet-compute", version=1).create()
    for argv in (
        ("service", "disable", "compute-1"),
        ("service", "disable", "compute-2"),
        ("flavor", "delete", "small"),
        ("service", "delete", "gone"),
    ):
        code, out, err = await fleet.run(*argv, login=host_login)
        assert code == 1, (argv, err)
        assert out == "" and len(err.splitlines()) == 1 and "refused" in err, (argv, err)
    for host in ("compute-1", "compute-2"):
        svc = await Service.get_by_host_and_binary(cluster.ctxt, host, "fleet-compute")
        assert not svc.disabled
    assert await Flavor.get_by_flavor_id(cluster.ctxt, "small")
    assert await Service.get_by_host_and_binary(cluster.ctxt, "gone", "fleet-compute")


async def test_lock_unlock_and_delete_by_name(fleet: Fleet) -> None:
    await fleet.json("boot", "--flavor", "small", "--name", "lockme", "--wait")
    await fleet.ok("lock", "lockme", "--reason", "audit")
    code, _, err = await fleet.run("delete", "lockme")
    assert code == 1 and len(err.splitlines()) == 1
    await fleet.ok("unlock", "lockme")
    await fleet.ok("delete", "lockme", "--wait")
    code, _, _ = await fleet.run("show", "lockme")
    assert code == 1
