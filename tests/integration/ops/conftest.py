"""Operating a real cluster: conductor and agents as separate processes, observed from outside.

Each test gets a fresh PostgreSQL database and its own control exchange in the session's private
RabbitMQ vhost (``tests/conftest.py``). ``ops_cluster`` can give every process a metrics port
(``FLEET_METRICS_PORT``) so tests scrape them like Prometheus would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, cast

import pytest
from ops_cluster import OpsCluster, OpsClusterFactory

from shared_objects.testing.rabbit_node import free_port


@pytest.fixture
def ops_cluster(cluster_factory: Any) -> OpsClusterFactory:
    """``async with ops_cluster(metrics=True, common_env=..., agent_env=...) as cluster``: the
    session's ``cluster_factory`` (flavor ``small``, every process stopped and checked at the
    end) with metrics ports for every process when ``metrics``."""

    def make(
        *,
        metrics: bool = False,
        agent_env: Mapping[str, Mapping[str, str]] | None = None,
        **overrides: Any,
    ) -> contextlib.AbstractAsyncContextManager[OpsCluster]:
        hosts = overrides.setdefault("hosts", ("compute-1", "compute-2"))
        per_agent = {h: dict((agent_env or {}).get(h, {})) for h in hosts}
        conductor_env: dict[str, str] = {}
        if metrics:
            conductor_env["FLEET_METRICS_PORT"] = str(free_port())
            for host in hosts:
                per_agent[host]["FLEET_METRICS_PORT"] = str(free_port())
        return cast(
            contextlib.AbstractAsyncContextManager[OpsCluster],
            cluster_factory(
                agent_env=per_agent,
                cluster_class=lambda spec: OpsCluster(spec, conductor_env),
                **overrides,
            ),
        )

    return make
