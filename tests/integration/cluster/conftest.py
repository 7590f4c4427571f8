"""A real cluster per test: conductor and agents as separate processes on the real RabbitMQ and
a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from conductor.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor

ClusterFactory = Callable[..., contextlib.AbstractAsyncContextManager[LocalCluster]]


@pytest.fixture
def cluster_factory(
    pg_database_url: str, amqp_url: str, control_exchange: str, tmp_path: Path
) -> ClusterFactory:
    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[LocalCluster]:
        common_env = {"FLEET_COMPUTE__SPAWN_DELAY": "0.05"}
        common_env.update(overrides.pop("common_env", {}))
        spec = ClusterSpec(
            database_url=pg_database_url,
            transport_url=amqp_url,
            control_exchange=control_exchange,
            workdir=tmp_path / "cluster",
            common_env=common_env,
            **overrides,
        )
        cluster = LocalCluster(spec)
        try:
            await cluster.start()
            await Flavor(
                cluster.ctxt, name="small", flavorid="small", vcpus=1, memory_mb=512, root_gb=1
            ).create()
            yield cluster
        finally:
            codes = await cluster.stop()
            bad = {n: c for n, c in codes.items() if c not in (0, None, -9)}
            assert not bad, f"processes exited uncleanly: {bad}"

    return make
