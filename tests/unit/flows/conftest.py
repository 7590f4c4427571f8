"""An in-process fleet on the in-memory transport: one conductor, N agents with fake hypervisors.

Fast checks of the build flow's logic; the same flows are proven across real processes on
RabbitMQ and PostgreSQL in ``tests/integration/cluster``.

As on RabbitMQ, every party logs in as its own user: the conductor as ``fleet-conductor-1``,
each agent as ``fleet-host-<host>`` (its own transport, owned by the agent service), the test
driver (``tasks``, the compute-task API) as ``fleet-operator``; all on one memory broker. The
AMQP ``user_id`` each server sees is therefore the caller's real login, so authorisation is
exercised here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from compute_agent.service import ComputeAgentService
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from conductor.db import migration
from conductor.db.session import Database
from conductor.indirection import BaseAPIEndpoint, ConductorIndirectionEndpoint
from conductor.tasks.build import BuildSettings
from conductor.tasks.endpoint import ComputeTaskEndpoint
from shared_objects.base import FleetObject
from shared_objects.config import FleetConfig
from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.identity import Identities
from shared_objects.messaging import RPCServer, Target, Transport, get_transport
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import TOPIC as CONDUCTOR_TOPIC
from shared_objects.serializer import FleetObjectSerializer

CONDUCTOR_LOGIN = "fleet-conductor-1"
OPERATOR_LOGIN = "fleet-operator"


def _memory_config(cfg: FleetConfig) -> FleetConfig:
    """A fleet configuration on a fresh memory broker with its own control exchange."""
    cfg.messaging.transport_url = f"memory://{uuid.uuid4().hex}"
    cfg.messaging.control_exchange = f"fleet-{uuid.uuid4().hex[:8]}"
    return cfg


def login_config(cfg: FleetConfig, login: str, host: str | None = None) -> FleetConfig:
    """``cfg`` for one party: the same memory broker, logged in as ``login``."""
    broker = cfg.messaging.transport_url.rpartition("@")[2].removeprefix("memory://")
    messaging = dataclasses.replace(cfg.messaging, transport_url=f"memory://{login}@{broker}")
    return dataclasses.replace(cfg, host=host or cfg.host, messaging=messaging)


def party_transport(cfg: FleetConfig, login: str) -> Transport:
    return get_transport(
        login_config(cfg, login).messaging, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS
    )


def agent_config(cfg: FleetConfig, host: str) -> FleetConfig:
    """An agent's configuration: its host and its own login (``[security]`` naming rule)."""
    return login_config(cfg, Identities(cfg.security).login_for_host(host), host)


@dataclasses.dataclass
class InProcessFleet:
    database: Database
    tasks: ComputeTaskAPI
    agents: dict[str, ComputeAgentService]
    # The conductor's client of the agents (tests cap its version like an upgrade would).
    compute: ComputeAPI | None = None

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[RequestContext]:
        ctxt = RequestContext(user_id="admin", project_id="p1", caller=OPERATOR_LOGIN)
        async with self.database.request(ctxt):
            yield ctxt

    def driver(self, host: str) -> FakeDriver:
        driver = self.agents[host].driver
        assert isinstance(driver, FakeDriver)
        return driver

    async def restart_agent(self, host: str) -> ComputeAgentService:
        """Start ``host``'s agent again (after ``stop``) on a fresh driver over the same
        hypervisor state, as a restarted process would."""
        old = self.agents[host]
        driver = FakeDriver(self.driver(host).config)
        agent = ComputeAgentService(old.cfg, driver=driver)
        await agent.start()
        self.agents[host] = agent
        return agent

    def database_outage(self) -> DatabaseOutage:
        """Switchable outage of the conductor's database (see ``DatabaseOutage``)."""
        return DatabaseOutage(self.database)


class DatabaseOutage:
    """While ``down``, every unit of work of the conductor fails as a refused connection
    would (``ConnectionRefusedError`` from the driver): what a restarting PostgreSQL does to
    it. The conductor's boundary turns that into ``DatabaseUnavailable`` for the caller."""

    def __init__(self, database: Database) -> None:
        self.down = False
        self.refused = 0
        original = database.request

        @contextlib.asynccontextmanager
        async def request(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            if self.down:
                self.refused += 1
                raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
            async with original(*args, **kwargs) as db:
                yield db

        database.request = request  # type: ignore[method-assign]

    def for_seconds(self, seconds: float) -> None:
        """Go down now and come back by itself after ``seconds``."""
        import asyncio

        self.down = True
        asyncio.get_running_loop().call_later(seconds, setattr, self, "down", False)


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
        cfg = _memory_config(FleetConfig())
        cfg.compute.spawn_delay = 0.0
        transport = party_transport(cfg, CONDUCTOR_LOGIN)
        operator = party_transport(cfg, OPERATOR_LOGIN)
        previous = FleetObject.indirection_api
        agents: dict[str, ComputeAgentService] = {}
        async with transport, operator:
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
                    hcfg = agent_config(cfg, host)
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
                    # Its own transport (created and closed by the service), as a process has.
                    agent = ComputeAgentService(hcfg, driver=driver)
                    await agent.start()
                    agents[host] = agent
                async with database.request(RequestContext()) as _:
                    pass
                yield InProcessFleet(
                    database, ComputeTaskAPI(operator, timeout=30), agents, compute
                )
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


# --- live migration: a fleet whose agents can be crashed and restarted ----------------------


@dataclasses.dataclass
class LiveMigrationFleet:
    """An in-process fleet for live-migration flows: agents can be killed and restarted.

    ``crash(host)`` stops the agent as a SIGKILL would, as far as one process allows: its RPC
    server drops in-flight requests without replying (callers see heartbeats stop), its
    migration tasks are cancelled without cleanup, nothing more is reported. The hypervisor's
    state file stays; ``restart(host)`` loads it into a fresh driver and agent.
    """

    database: Database
    tasks: ComputeTaskAPI
    endpoint: ComputeTaskEndpoint
    # The conductor's transport; each agent has its own (agent_config), the test driver too.
    transport: Any
    cfg: FleetConfig
    driver_configs: dict[str, FakeDriverConfig]
    agent_settings: Any
    agents: dict[str, ComputeAgentService]
    crashed: dict[str, ComputeAgentService] = dataclasses.field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[RequestContext]:
        ctxt = RequestContext(user_id="admin", project_id="p1", caller=OPERATOR_LOGIN)
        async with self.database.request(ctxt):
            yield ctxt

    def driver(self, host: str) -> FakeDriver:
        driver = self.agents[host].driver
        assert isinstance(driver, FakeDriver)
        return driver

    async def start_agent(self, host: str, failures: str = "") -> ComputeAgentService:
        config = dataclasses.replace(self.driver_configs[host], failures=failures)
        # Its own transport and login (created and closed by the service), as a process has.
        agent = ComputeAgentService(agent_config(self.cfg, host), driver=FakeDriver(config))
        # One settings object is shared by the manager and its resolver: update it in place.
        for field in dataclasses.fields(self.agent_settings):
            setattr(
                agent.live_migration.settings, field.name, getattr(self.agent_settings, field.name)
            )
        await agent.start()
        self.agents[host] = agent
        return agent

    async def crash(self, host: str) -> None:
        agent = self.agents.pop(host)
        await agent.server.stop(grace=0)
        await agent.live_migration.stop()
        await agent.reporter.stop()
        flusher = agent.tracker._flusher
        if flusher is not None:
            flusher.cancel()
        self.crashed[host] = agent

    async def restart(self, host: str, failures: str = "") -> ComputeAgentService:
        self.crashed.pop(host, None)
        return await self.start_agent(host, failures)

    async def flush(self) -> None:
        for agent in self.agents.values():
            await agent.run_as_agent(agent.tracker.flush())


@pytest.fixture
def lm_fleet_factory(
    tmp_path: Path,
) -> Callable[..., contextlib.AbstractAsyncContextManager[LiveMigrationFleet]]:
    from compute_agent.live_migration import LiveMigrationSettings
    from compute_agent.virt.migration_model import MigrationModel
    from conductor.tasks.live_migration import LiveMigrationTaskSettings

    @contextlib.asynccontextmanager
    async def make(
        hosts: tuple[str, ...] = ("host-a", "host-b"),
        *,
        vcpus: int = 8,
        memory_mb: int = 8192,
        disk_gb: int = 200,
        failures: dict[str, str] | None = None,
        migration: dict[str, MigrationModel] | MigrationModel | None = None,
        agent_settings: LiveMigrationSettings | None = None,
        conductor_settings: LiveMigrationTaskSettings | None = None,
    ) -> AsyncIterator[LiveMigrationFleet]:
        url = f"sqlite+aiosqlite:///{tmp_path}/fleet.db"
        await migration_upgrade(url)
        database = Database(url)
        cfg = _memory_config(FleetConfig())
        cfg.compute.spawn_delay = 0.0
        transport = party_transport(cfg, CONDUCTOR_LOGIN)
        operator = party_transport(cfg, OPERATOR_LOGIN)
        previous = FleetObject.indirection_api
        fast = LiveMigrationSettings(
            call_monitor_timeout=2.0,
            rpc_timeout=1.0,
            phase_query_timeout=1.0,
            long_call_timeout=120.0,
            progress_interval=0.05,
            settle_retry_interval=0.3,
        )
        models = migration if isinstance(migration, dict) else {}
        async with transport, operator:
            compute = ComputeAPI(transport, FleetObjectSerializer())
            endpoint = ComputeTaskEndpoint(
                database,
                compute,
                BuildSettings(service_down_time=60.0),
                conductor_settings
                or LiveMigrationTaskSettings(
                    call_monitor_timeout=2.0, precheck_timeout=60.0, rpc_timeout=5.0
                ),
            )
            server = RPCServer(
                transport,
                Target(topic=CONDUCTOR_TOPIC, server="conductor-1"),
                endpoints=[ConductorIndirectionEndpoint(database), BaseAPIEndpoint(), endpoint],
                serializer=FleetObjectSerializer(),
            )
            await server.start()
            fleet = LiveMigrationFleet(
                database,
                ComputeTaskAPI(operator, timeout=30),
                endpoint,
                transport,
                cfg,
                {},
                agent_settings or fast,
                {},
            )
            try:
                for host in hosts:
                    model = models.get(host) if models else migration
                    fleet.driver_configs[host] = FakeDriverConfig(
                        state_dir=tmp_path / "virt",
                        vcpus=vcpus,
                        memory_mb=memory_mb,
                        local_gb=disk_gb,
                        ram_allocation_ratio=cfg.compute.ram_allocation_ratio,
                        spawn_delay_s=0.0,
                        migration=model if isinstance(model, MigrationModel) else MigrationModel(),
                    )
                    await fleet.start_agent(host, (failures or {}).get(host, ""))
                yield fleet
            finally:
                for agent in fleet.agents.values():
                    await agent.stop(grace=2)
                for agent in fleet.crashed.values():
                    await agent.transport.close()  # a crashed agent's connection
                await server.stop(grace=2)
                FleetObject.indirection_api = previous
                await database.dispose()

    return make


migration_upgrade = migration.upgrade
