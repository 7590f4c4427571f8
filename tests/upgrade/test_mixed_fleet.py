"""A rolling upgrade in progress: the current conductor, an agent running the previous release's
real code (exported from git history) and a current agent (issue 6 acceptance a to d)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conductor.tools.release_tree import previous_release
from shared_objects import exception, releases
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

OLD, NEW = "compute-old", "compute-new"
VERSION_TROUBLE = ("IncompatibleObjectVersion", "UnsupportedVersion", "UnsupportedObjectVersion")


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line, "level": "raw"})
    return events


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


async def _migrate(cluster: Any, uuid: str, host: str) -> dict[str, Any]:
    migration_uuid = await cluster.tasks.live_migrate_instance(
        cluster.ctxt, instance_uuid=uuid, host=host
    )

    async def finished() -> dict[str, Any] | None:
        migration = await cluster.tasks.get_migration(cluster.ctxt, migration_uuid=migration_uuid)
        done = migration["status"] in ("completed", "failed", "error", "cancelled")
        return dict(migration) if done else None

    return await eventually(finished, 60, interval=0.1, what=f"migration {migration_uuid} end")


def _handled(log: Path, method: str) -> bool:
    """The process logged handling a ``method`` request (its lines carry the method)."""
    return any(e.get("method") == method for e in log_events(log))


async def _conductor_knows_both(cluster: Any) -> None:
    """The conductor learns each agent's release at its next levels refresh (1 s here): until
    it has seen both, calls to a host go at the oldest release, or at the newest when only the
    new agent had registered yet. Tests start once it knows both."""

    def saw_both() -> bool:
        return any(
            e.get("event") == "compute_rpc_version_cap" and {OLD, NEW} <= set(e.get("hosts") or {})
            for e in log_events(cluster.workdir / "conductor-1.log")
        )

    await eventually(saw_both, 20, interval=0.2, what="the conductor seeing both agents")


# Every release a fleet may upgrade from: the previous one, and skip-level from the oldest.
UPGRADES_FROM = sorted({previous_release().name, releases.RELEASES[0].name}, reverse=True)


@pytest.mark.parametrize("old_name", UPGRADES_FROM)
async def test_mixed_release_fleet_boots_migrates_detaches_and_refreshes(
    cluster_factory: Any,
    release_tree: Callable[[str], Path],
    broker_logins: BrokerLogins | None,
    old_name: str,
) -> None:
    old_release = releases.by_name(old_name)
    env = {
        "FLEET_TRACE_OBJECT_VERSIONS": "1",
        "FLEET_UPGRADE_LEVELS__REFRESH_INTERVAL": "1",
    }
    # The old agent runs on the shared login of the releases before per-host logins, which the
    # conductor and the new agent accept for it only because [security] lists the old host.
    shared = f"fleet-shared-{broker_logins.tag}" if broker_logins is not None else None
    async with cluster_factory(
        hosts=(OLD, NEW),
        agent_source={OLD: release_tree(old_name)},
        common_env=env,
        legacy_shared_login=shared,
    ) as cluster:
        ctxt = cluster.ctxt
        await _conductor_knows_both(cluster)
        await cluster.tasks.security_group_create(ctxt, name="web")
        on_old = (await cluster.boot(flavor="small", name="a", forced_host=OLD))[0]
        on_new = (await cluster.boot(flavor="small", name="b", forced_host=NEW))[0]
        web_old = (
            await cluster.boot(flavor="small", name="c", forced_host=OLD, security_groups=["web"])
        )[0]
        web_new = (
            await cluster.boot(flavor="small", name="d", forced_host=NEW, security_groups=["web"])
        )[0]
        insts = await cluster.wait_instances([on_old, on_new, web_old, web_new])
        assert [i.vm_state for i in insts] == ["active"] * 4

        # (a) live migration in both directions between the releases.
        assert (await _migrate(cluster, on_old, NEW))["status"] == "completed"
        assert (await _migrate(cluster, on_new, OLD))["status"] == "completed"
        moved = {u: (await Instance.get_by_uuid(ctxt, u)).host for u in (on_old, on_new)}
        assert moved == {on_old: NEW, on_new: OLD}

        # (a) volumes on the old agent, security-group refresh on both.
        await cluster.tasks.attach_volume(ctxt, instance_uuid=on_new, volume_id="vol-up")
        await cluster.tasks.detach_volume(ctxt, instance_uuid=on_new, volume_id="vol-up")
        assert list(await BlockDeviceMappingList.get_by_instance_uuid(ctxt, on_new)) == []
        refreshed = await cluster.tasks.security_group_rule_add(
            ctxt, group="web", protocol="tcp", from_port=22, to_port=22, cidr="10.0.0.0/8"
        )
        assert refreshed["refreshed_hosts"] == {OLD: 1, NEW: 1}
        # The refresh casts land on both agents before their logs are checked: each logs the
        # Instance it received under the method's name (object-version tracing is on).
        await eventually(
            lambda: all(
                _handled(cluster.workdir / f"{h}.log", "refresh_instance_security_rules")
                for h in (OLD, NEW)
            ),
            what="the refresh reaching both agents",
        )

        logs = {name: log_events(cluster.workdir / f"{name}.log") for name in cluster.processes}

        # (a) no version errors anywhere.
        for name, events in logs.items():
            bad = [
                e
                for e in events
                if any(word in json.dumps(e) for word in VERSION_TROUBLE)
                or e.get("event") == "object_backported"
            ]
            assert bad == [], f"{name}: version trouble {bad[:3]}"

        # (b) the old agent only ever received versions its release knows (its own log says).
        received_old = [e for e in logs[OLD] if e.get("event") == "object_received"]
        assert received_old, "the old agent traced no object versions"
        for event in received_old:
            known = old_release.objects[event["object"]]
            assert _version_tuple(event["version"]) <= _version_tuple(known), event
        # ... and the current agent received this release's versions.
        received_new = {
            (e["object"], e["version"]) for e in logs[NEW] if e.get("event") == "object_received"
        }
        assert ("Instance", releases.CURRENT.objects["Instance"]) in received_new

        # (c) while the old agent is registered, every agent is called at the capped version.
        cap = old_release.compute_rpc_api
        for host in (OLD, NEW):
            versions = {e.get("rpc_version") for e in logs[host] if e.get("rpc_version")}
            assert versions and all(_version_tuple(v) <= _version_tuple(cap) for v in versions), (
                host,
                versions,
            )
        caps = [e for e in logs["conductor-1"] if e.get("event") == "compute_rpc_version_cap"]
        assert caps and caps[-1]["cap"] == cap

        # (c) stop the old agent: once its service is down, SIGHUP lifts the cap at once.
        assert await cluster.stop_process(OLD) == 0
        # Not a wait for an event: the old agent's service must have been silent for longer
        # than the down time before the conductor may count it as gone.
        await asyncio.sleep(cluster.spec.service_down_time + 1)
        conductor = cluster.processes["conductor-1"].process
        assert conductor is not None
        os.kill(conductor.pid, signal.SIGHUP)
        expected = releases.CURRENT.compute_rpc_api

        def lifted() -> bool:
            return expected == cap or any(
                e.get("event") == "compute_rpc_version_cap" and e.get("cap") == expected
                for e in log_events(cluster.workdir / "conductor-1.log")
            )

        await eventually(lifted, 10, interval=0.2, what="the compute RPC cap lifting")


async def test_too_new_object_sent_to_an_old_agent_is_backported_and_counted(
    cluster_factory: Any, release_tree: Callable[[str], Path]
) -> None:
    """(d) The receiver-side safety net: a sender that ignores the levels still works (an
    agent of release 1.0, which knows only Instance 1.0)."""
    previous_release_tree = release_tree(releases.RELEASES[0].name)
    import urllib.request

    from shared_objects.rpc_clients.compute import ComputeAPI
    from shared_objects.serializer import FleetObjectSerializer
    from shared_objects.testing.rabbit_node import free_port

    port = free_port()
    async with cluster_factory(
        hosts=(OLD,),
        agent_source={OLD: previous_release_tree},
        agent_env={OLD: {"FLEET_METRICS_PORT": str(port)}},
    ) as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm", forced_host=OLD)
        await cluster.wait_instances([uuid])
        instance = await Instance.get_by_uuid(cluster.ctxt, uuid)
        # A careless sender: no upgrade levels, objects at this release's versions.
        # Only a conductor may call an agent: send it under a conductor's login.
        async with cluster.transport_as(cluster.login_of("conductor-1")) as conductor_transport:
            careless = ComputeAPI(conductor_transport, FleetObjectSerializer())
            await careless.refresh_instance_security_rules(cluster.ctxt, OLD, instance=instance)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        async def backport_counted() -> bool:
            text = await asyncio.to_thread(scrape)
            counted = [
                line
                for line in text.splitlines()
                if line.startswith("fleet_object_backports_total") and 'object="Instance"' in line
            ]
            return bool(counted) and float(counted[0].rsplit(" ", 1)[1]) >= 1

        await eventually(backport_counted, 10, interval=0.2, what="the old agent's backport count")
        events = log_events(cluster.workdir / f"{OLD}.log")
        backported = [e for e in events if e.get("event") == "object_backported"]
        assert backported and backported[0]["object"] == "Instance"
        assert backported[0]["version"] == releases.CURRENT.objects["Instance"]
        errors = [e for e in events if e.get("level") == "error"]
        assert errors == []


async def _latest_fault(cluster: Any, uuid: str) -> InstanceFault | None:
    try:
        return await InstanceFault.get_latest_for_instance(cluster.ctxt, uuid)
    except exception.InstanceFaultNotFound:
        return None


@pytest.mark.parametrize("old_name", UPGRADES_FROM)
async def test_driver_errors_between_releases_reach_callers_as_they_did(
    cluster_factory: Any,
    release_tree: Callable[[str], Path],
    broker_logins: BrokerLogins | None,
    old_name: str,
) -> None:
    """An old agent still sends its driver's errors (``compute_agent.virt.exceptions``, which the
    conductor no longer allows): the conductor rebuilds them as the contract's class of that
    name, so the fault reads as before. A current agent sends the contract's class, which an
    old agent does not know by name: it gets a ``RemoteError`` and rolls back as it did."""
    shared = f"fleet-shared-{broker_logins.tag}" if broker_logins is not None else None
    async with cluster_factory(
        hosts=(OLD, NEW),
        agent_source={OLD: release_tree(old_name)},
        agent_env={
            OLD: {"FLEET_FAKE_FAILURES": "check_can_live_migrate_destination:*"},
            NEW: {"FLEET_COMPUTE__FAILURES": "pre_live_migration:*"},
        },
        common_env={"FLEET_UPGRADE_LEVELS__REFRESH_INTERVAL": "1"},
        legacy_shared_login=shared,
    ) as cluster:
        await _conductor_knows_both(cluster)
        on_old = (await cluster.boot(flavor="small", name="a", forced_host=OLD))[0]
        on_new = (await cluster.boot(flavor="small", name="b", forced_host=NEW))[0]
        await cluster.wait_instances([on_old, on_new])

        # The old destination refuses the conductor's precheck with its driver's error.
        assert (await _migrate(cluster, on_new, OLD))["status"] == "failed"
        # The fault is recorded as the migration settles: poll for it.
        fault = await eventually(lambda: _latest_fault(cluster, on_new), what="fault of a")
        step = "check_can_live_migrate_destination"
        assert f"{OLD}: InjectedFailure: injected failure at step {step}" in (fault.message or "")

        # The new destination fails the old source's pre_live_migration with the shared error.
        assert (await _migrate(cluster, on_old, NEW))["status"] == "failed"
        fault = await eventually(lambda: _latest_fault(cluster, on_old), what="fault of b")
        assert "injected failure at step pre_live_migration" in (fault.message or "")
        for uuid, host in ((on_new, NEW), (on_old, OLD)):
            instance = await Instance.get_by_uuid(cluster.ctxt, uuid)
            assert (instance.vm_state, instance.task_state, instance.host) == ("active", None, host)
