"""SIGTERM to an agent during a boot storm (issue 7 d): it drains and exits 0 within the grace
period, and no instance is lost.

Two cases:

- every build the agent received is already running (default ``max_concurrency``): the running
  builds finish during the drain and every instance ends ACTIVE, without a restart;
- the agent takes builds two at a time (``max_concurrency = 2``), so at SIGTERM some builds are
  still queued: the running ones finish, the queued ones go back to the broker and wait in the
  agent's queue ``compute.<host>`` (the instances stay ``building``/``scheduling``, host unset,
  nothing in ERROR); once the agent is started again every instance ends ACTIVE on it.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from ops_cluster import OpsCluster, OpsClusterFactory

from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.testing.broker import queue_counts_ctl
from shared_objects.testing.eventually import eventually

pytestmark = pytest.mark.integration

GRACE = 20.0  # FLEET_SERVICE__GRACEFUL_SHUTDOWN_TIMEOUT of every cluster process
STORM = 30
SLOW_SPAWN = {"FLEET_COMPUTE__SPAWN_DELAY": "1"}


async def spawning_on(cluster: OpsCluster, uuids: list[str], host: str) -> list[str]:
    """Instances of ``uuids`` that ``host`` is building right now (claimed, not yet ACTIVE)."""
    insts = await InstanceList.get_by_uuids(cluster.ctxt, uuids)
    return [
        i.uuid
        for i in insts
        if i.host == host and i.task_state in ("block_device_mapping", "spawning")
    ]


async def wait_spawning(cluster: OpsCluster, uuids: list[str], host: str) -> list[str]:
    return await eventually(
        lambda: spawning_on(cluster, uuids, host),
        30,
        what=f"{host} building any of the storm's instances",
    )


async def sigterm(cluster: OpsCluster, host: str) -> tuple[int | None, float]:
    started = time.monotonic()
    code = await cluster.stop_process(host, timeout=GRACE + 15)
    return code, time.monotonic() - started


def log_events(cluster: OpsCluster, host: str) -> list[str]:
    return [str(r.get("event")) for r in cluster.log_lines(host)]


async def test_sigterm_mid_storm_drains_running_builds_and_nothing_is_lost(
    ops_cluster: OpsClusterFactory,
) -> None:
    async with ops_cluster(common_env=SLOW_SPAWN) as cluster:
        uuids = await cluster.boot(flavor="small", name="storm", count=STORM)
        in_flight = await wait_spawning(cluster, uuids, "compute-1")

        code, took = await sigterm(cluster, "compute-1")

        print(f"compute-1: {len(in_flight)} builds in flight at SIGTERM; exit {code}, {took:.2f}s")
        assert code == 0
        assert took < GRACE, f"drain took {took:.1f}s"
        events = log_events(cluster, "compute-1")
        assert "service_stopping" in events and "compute_agent_stopped" in events
        assert "rpc_server_stop_cancelled_handlers" not in events  # nothing cut short
        # Every instance settles ACTIVE with compute-1 down: its builds finished while draining.
        insts = await cluster.wait_instances(uuids, timeout=60)
        assert Counter(i.vm_state for i in insts) == {"active": STORM}
        hosts = {i.uuid: i.host for i in insts}
        assert all(hosts[u] == "compute-1" for u in in_flight)
        assert set(hosts.values()) == {"compute-1", "compute-2"}


async def test_sigterm_with_queued_builds_keeps_them_until_the_agent_restarts(
    ops_cluster: OpsClusterFactory, amqp_vhost: str
) -> None:
    if not amqp_vhost:
        pytest.skip("needs rabbitmqctl (a private vhost) to read the agent's queue")
    env = {**SLOW_SPAWN, "FLEET_MESSAGING__MAX_CONCURRENCY": "2"}
    async with ops_cluster(common_env=env) as cluster:
        uuids = await cluster.boot(flavor="small", name="storm", count=STORM)
        await wait_spawning(cluster, uuids, "compute-1")

        code, took = await sigterm(cluster, "compute-1")

        assert code == 0
        assert took < GRACE, f"drain took {took:.1f}s"
        assert "rpc_server_stop_cancelled_handlers" not in log_events(cluster, "compute-1")

        # compute-2 finishes its share; compute-1's unstarted builds are parked, not failed:
        # wait until compute-2's queue is empty and nothing is being built any more.
        async def parked_in_queue() -> list[Instance]:
            insts = await InstanceList.get_by_uuids(cluster.ctxt, uuids)
            parked = [i for i in insts if i.vm_state != "active"]
            ready_1 = await queue_counts_ctl("compute.compute-1", vhost=amqp_vhost)
            busy_2 = await queue_counts_ctl("compute.compute-2", vhost=amqp_vhost)
            settled = all(i.task_state == "scheduling" for i in parked)
            assert settled and busy_2 == (0, 0) and ready_1 == (len(parked), 0), (
                ready_1,
                busy_2,
                len(parked),
            )
            return parked

        parked = await eventually(parked_in_queue, 90, interval=0.5)
        print(f"compute-1: exit {code} in {took:.2f}s, {len(parked)} builds parked in its queue")
        assert parked, "expected builds still queued for compute-1 at SIGTERM"
        # Parked, and assigned to the host whose queue holds them (release 1.2 assigns a build
        # to its host when it is placed).
        assert all(
            i.vm_state == "building" and i.task_state == "scheduling" and i.host == "compute-1"
            for i in parked
        ), [(i.vm_state, i.task_state, i.host) for i in parked]

        await cluster.restart_agent("compute-1")
        insts = await cluster.wait_instances(uuids, timeout=90)
        assert Counter(i.vm_state for i in insts) == {"active": STORM}
        assert {i.host for i in insts if i.uuid in {p.uuid for p in parked}} == {"compute-1"}
