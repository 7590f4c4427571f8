"""An in-process fleet on the in-memory transport: one conductor, N agents with fake hypervisors.

Fast checks of the build flow's logic; the same flows are proven across real processes on
RabbitMQ and PostgreSQL in ``tests/integration/cluster``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from compute_agent.rpcapi import ComputeAPI
from compute_agent.service import ComputeAgentService
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from conductor.db import migration
from conductor.db.session import Database
from conductor.indirection import CONDUCTOR_TOPIC, BaseAPIEndpoint, ConductorIndirectionEndpoint
from conductor.tasks.build import BuildSettings
from conductor.tasks.endpoint import ComputeTaskEndpoint
from conductor.tasks.rpcapi import ComputeTaskAPI
from shared_objects.base import FleetObject
from shared_objects.config import FleetConfig
from shared_objects.context import RequestContext
from shared_objects.messaging import RPCServer, Target, get_transport
from shared_objects.serializer import FleetObjectSerializer

EXMODS = ["shared_objects.exception", "compute_agent.virt.exceptions"]


@dataclasses.dataclass
class InProcessFleet:
    database: Database
    tasks: ComputeTaskAPI
    agents: dict[str, ComputeAgentService]

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[RequestContext]:
        ctxt = RequestContext(user_id="admin", project_id="p1")
        async with self.database.request(ctxt):
            yield ctxt

    def driver(self, host: str) -> FakeDriver:
        driver = self.agents[host].driver
        assert isinstance(driver, FakeDriver)
        return driver


@pytest.fixture
def fleet_factory(
    tmp_path: Path,
) -> Callable[..., contextlib.AbstractAsyncContextManager[InProcessFleet]]:
    @contextlib.asynccontextmanager
    async def make(
        hosts: tuple[str, ...] = ("host-a", "host-b"),
        *,
        vcpus: int = 8,
        memory_mb: int = 8192,
        disk_gb: int = 200,
        failures: dict[str, str] | None = None,
    ) -> AsyncIterator[InProcessFleet]:
        url = f"sqlite+aiosqlite:///{tmp_path}/fleet.db"
        await migration.upgrade(url)
        database = Database(url)
        cfg = FleetConfig()
        cfg.messaging.transport_url = f"memory://{uuid.uuid4().hex}"
        cfg.messaging.control_exchange = f"fleet-{uuid.uuid4().hex[:8]}"
        cfg.compute.spawn_delay = 0.0
        transport = get_transport(cfg.messaging, allowed_remote_exmods=EXMODS)
        previous = FleetObject.indirection_api
        agents: dict[str, ComputeAgentService] = {}
        async with transport:
            compute = ComputeAPI(transport, FleetObjectSerializer())
            settings = BuildSettings(service_down_time=60.0)
            endpoint = ComputeTaskEndpoint(database, compute, settings)
            server = RPCServer(
                transport,
                Target(topic=CONDUCTOR_TOPIC, server="conductor-1"),
                endpoints=[ConductorIndirectionEndpoint(database), BaseAPIEndpoint(), endpoint],
                serializer=FleetObjectSerializer(),
            )
            await server.start()
            try:
                for host in hosts:
                    hcfg = dataclasses.replace(cfg, host=host)
                    driver = FakeDriver(
                        FakeDriverConfig(
                            state_dir=tmp_path / "virt",
                            vcpus=vcpus,
                            memory_mb=memory_mb,
                            local_gb=disk_gb,
                            ram_allocation_ratio=hcfg.compute.ram_allocation_ratio,
                            spawn_delay_s=0.0,
                            failures=(failures or {}).get(host, ""),
                        )
                    )
                    agent = ComputeAgentService(hcfg, driver=driver, transport=transport)
                    await agent.start()
                    agents[host] = agent
                async with database.request(RequestContext()) as _:
                    pass
                yield InProcessFleet(database, ComputeTaskAPI(transport, timeout=30), agents)
            finally:
                for agent in agents.values():
                    await agent.stop(grace=5)
                await server.stop(grace=5)
                FleetObject.indirection_api = previous
                await database.dispose()

    return make


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    return _wait_for


async def _wait_for(predicate: Callable[[], Any], within: float = 10.0) -> Any:
    import asyncio

    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {value!r})")
        await asyncio.sleep(0.05)
