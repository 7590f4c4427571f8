"""Operating a real cluster: conductor and agents as separate processes, observed from outside.

Each test gets a fresh PostgreSQL database and its own control exchange in the session's private
RabbitMQ vhost (``tests/conftest.py``). ``ops_cluster`` can give every process a metrics port
(``FLEET_METRICS_PORT``) so tests scrape them like Prometheus would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from ops_cluster import OpsCluster, OpsClusterFactory

from conductor.cluster import ClusterSpec
from shared_objects.objects.flavor import Flavor
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.rabbit_node import free_port


@pytest.fixture
def ops_cluster(
    pg_database_url: str,
    amqp_url: str,
    control_exchange: str,
    tmp_path: Path,
    broker_logins: BrokerLogins | None,
) -> OpsClusterFactory:
    """``async with ops_cluster(metrics=True, common_env=..., agent_env=...) as cluster``.

    Creates flavor ``small`` (1 vCPU, 512 MB, 1 GB). On exit every process is stopped and must
    have exited 0 (or been SIGKILLed by the test itself).
    """

    @contextlib.asynccontextmanager
    async def make(
        *,
        metrics: bool = False,
        common_env: Mapping[str, str] | None = None,
        agent_env: Mapping[str, Mapping[str, str]] | None = None,
        **overrides: Any,
    ) -> AsyncIterator[OpsCluster]:
        env = {"FLEET_COMPUTE__SPAWN_DELAY": "0.05"}
        env.update(common_env or {})
        hosts = overrides.get("hosts", ("compute-1", "compute-2"))
        per_agent = {h: dict((agent_env or {}).get(h, {})) for h in hosts}
        conductor_env: dict[str, str] = {}
        if metrics:
            conductor_env["FLEET_METRICS_PORT"] = str(free_port())
            for host in hosts:
                per_agent[host]["FLEET_METRICS_PORT"] = str(free_port())
        spec = ClusterSpec(
            database_url=pg_database_url,
            transport_url=amqp_url,
            control_exchange=control_exchange,
            workdir=tmp_path / "cluster",
            common_env=env,
            agent_env=per_agent,
            logins=overrides.pop("logins", broker_logins),
            **overrides,
        )
        cluster = OpsCluster(spec, conductor_env)
        try:
            await cluster.start()
            await Flavor(
                cluster.ctxt, name="small", flavorid="small", vcpus=1, memory_mb=512, root_gb=1
            ).create()
            yield cluster
        finally:
            codes = await cluster.stop()
            # -9: killed by the test itself; None would mean SIGKILLed after a hung stop.
            bad = {n: c for n, c in codes.items() if c not in (0, -9)}
            assert not bad, f"processes exited uncleanly: {bad}"

    return make
