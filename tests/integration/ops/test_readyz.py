"""``/readyz`` says what ``docs/operations.md`` claims (issue 16, 7): 503 while the broker
connection is down and while the service drains after SIGTERM, 200 again once the broker is
back, for real processes probed over HTTP.

The broker outage runs on a private RabbitMQ node (the shared one is never stopped): its
application is stopped (every connection closed by the broker) and started again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from ops_cluster import OpsCluster, ahttp_get

from conductor.tools.cluster import ClusterSpec
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import InstanceList
from shared_objects.testing import RabbitNode
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.rabbit_node import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HOSTS = ("compute-1",)
# Services reconnect every second once the broker answers again.
WITHIN = 30.0


def agents_with_metrics() -> dict[str, dict[str, str]]:
    return {h: {"FLEET_METRICS_PORT": str(free_port())} for h in HOSTS}


async def readyz(port: int) -> int:
    try:
        return (await ahttp_get(port, "/readyz"))[0]
    except OSError:
        return -1  # not listening (yet, or any more)


async def until_status(ports: Iterable[int], status: int, within: float = WITHIN) -> float:
    """Seconds until every port's ``/readyz`` answers ``status``."""
    started = time.monotonic()
    seen: dict[int, int] = {}
    while time.monotonic() - started < within:
        seen = {port: await readyz(port) for port in ports}
        if set(seen.values()) == {status}:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz never answered {status} everywhere within {within} s: {seen}")


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


async def test_readyz_is_503_while_the_broker_is_down_and_200_once_it_is_back(
    node: RabbitNode, pg_database_url: str, tmp_path: Path
) -> None:
    spec = ClusterSpec(
        database_url=pg_database_url,
        transport_url=node.url,
        hosts=HOSTS,
        workdir=tmp_path / "cluster",
        agent_env=agents_with_metrics(),
        logins=BrokerLogins.for_node(node),
        common_env={"FLEET_COMPUTE__SPAWN_DELAY": "0.05"},
    )
    cluster = OpsCluster(spec, {"FLEET_METRICS_PORT": str(free_port())})
    try:
        await cluster.start()
        ports = list(cluster.metrics_ports.values())
        assert set(cluster.metrics_ports) == {"conductor-1", *HOSTS}
        await until_status(ports, 200, within=10)

        await node.stop_app()
        down_after = await until_status(ports, 503)
        # Still alive: the processes wait for the broker, they do not exit.
        assert all(handle.running for handle in cluster.processes.values())
        assert {(await ahttp_get(p, "/healthz"))[0] for p in ports} == {200}

        await node.start_app()
        back_after = await until_status(ports, 200)
        print(f"/readyz: 503 {down_after:.2f}s after stop_app, 200 {back_after:.2f}s after start")
    finally:
        codes = await cluster.stop()
    assert set(codes.values()) <= {0}, codes


async def test_readyz_is_503_while_the_agent_drains_a_build(
    pg_database_url: str,
    amqp_url: str,
    control_exchange: str,
    broker_logins: BrokerLogins | None,
    tmp_path: Path,
) -> None:
    spec = ClusterSpec(
        database_url=pg_database_url,
        transport_url=amqp_url,
        hosts=HOSTS,
        workdir=tmp_path / "cluster",
        agent_env=agents_with_metrics(),
        control_exchange=control_exchange,
        logins=broker_logins,
        # A build takes 3 s: SIGTERM lands while it runs, and the agent drains it.
        common_env={
            "FLEET_COMPUTE__SPAWN_DELAY": "3",
            "FLEET_SERVICE__GRACEFUL_SHUTDOWN_TIMEOUT": "20",
        },
    )
    cluster = OpsCluster(spec, {})
    try:
        await cluster.start()
        port = cluster.metrics_ports["compute-1"]
        await until_status([port], 200, within=10)
        await Flavor(
            cluster.ctxt, name="small", flavorid="small", vcpus=1, memory_mb=512, root_gb=1
        ).create()
        uuids = await cluster.boot(flavor="small", name="slow")
        deadline = time.monotonic() + 30
        while True:
            (inst,) = await InstanceList.get_by_uuids(cluster.ctxt, uuids)
            if inst.task_state == "spawning":
                break
            assert time.monotonic() < deadline, (inst.vm_state, inst.task_state)
            await asyncio.sleep(0.05)

        stopping = asyncio.create_task(cluster.stop_process("compute-1", timeout=30))
        await until_status([port], 503, within=5)
        # Draining, not gone: the build is still running in the process.
        assert not stopping.done() and cluster.processes["compute-1"].running
        assert await stopping == 0
        (inst,) = await cluster.wait_instances(uuids, timeout=30)
        assert inst.vm_state == "active"  # the build finished during the drain
    finally:
        codes = await cluster.stop()
    assert {c for c in codes.values() if c is not None} <= {0}, codes
