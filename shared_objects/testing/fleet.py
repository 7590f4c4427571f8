"""An in-process fleet on the in-memory transport: one conductor, N real agents on fake hypervisors.

Fast checks of the flows' logic; the same flows are proven across real processes on RabbitMQ
and PostgreSQL by ``conductor.tools.cluster.LocalCluster``.

    async with in_process_fleet(tmp_path, hosts=("host-a", "host-b")) as fleet:
        await fleet.tasks.build_instances(...)

The conductor is the real ``ConductorService`` (on SQLite; the cap of its calls to agents is
pinned by hand, ``fleet.compute.set_version_cap``, not read from the services table) and every
agent the real ``ComputeAgentService``, each with its own transport. As on RabbitMQ, every
party logs in as its own user: the conductor as ``fleet-conductor-1``, each agent as
``fleet-host-<host>``, the test driver (``tasks``, the compute-task API) as ``fleet-operator``;
all on one memory broker, so the ``user_id`` each server sees is the caller's real login.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from compute_agent.live_migration import LiveMigrationSettings
from compute_agent.service import ComputeAgentService
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from compute_agent.virt.migration_model import MigrationModel
from conductor.db import migration as db_migration
from conductor.db.session import Database
from conductor.service import ConductorService
from conductor.tasks.endpoint import ComputeTaskEndpoint
from conductor.tasks.live_migration import LiveMigrationTaskSettings
from shared_objects.base import FleetObject
from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import Transport, get_transport
from shared_objects.testing.eventually import eventually
from shared_objects.testing.memory import as_login, memory_messaging

CONDUCTOR_LOGIN = "fleet-conductor-1"
CONDUCTOR_HOST = "conductor-1"
OPERATOR_LOGIN = "fleet-operator"


def fast_live_migration() -> LiveMigrationSettings:
    """The agents' live-migration timeouts, short enough for a test to see them expire."""
    return LiveMigrationSettings(
        call_monitor_timeout=2.0,
        rpc_timeout=1.0,
        phase_query_timeout=1.0,
        long_call_timeout=120.0,
        progress_interval=0.05,
        settle_retry_interval=0.3,
    )


def fast_live_migration_task() -> LiveMigrationTaskSettings:
    """The conductor's live-migration timeouts, short enough for a test."""
    return LiveMigrationTaskSettings(
        call_monitor_timeout=2.0, precheck_timeout=60.0, rpc_timeout=5.0
    )


def party_transport(cfg: FleetConfig, login: str) -> Transport:
    """A transport on the fleet's memory broker, logged in as ``login``."""
    return get_transport(
        as_login(cfg.messaging, login), allowed_remote_exmods=ALLOWED_REMOTE_EXMODS
    )


def agent_config(cfg: FleetConfig, host: str) -> FleetConfig:
    """An agent's configuration: its host and its own login (``[security]`` naming rule)."""
    login = Identities(cfg.security).login_for_host(host)
    return dataclasses.replace(cfg, host=host, messaging=as_login(cfg.messaging, login))


@dataclasses.dataclass
class InProcessFleet:
    """The conductor's parts, the test driver's client and the agents, by host.

    ``crash(host)`` stops an agent as a SIGKILL would, as far as one process allows: its RPC
    server drops in-flight requests without replying (callers see heartbeats stop), its
    migration tasks are cancelled without cleanup, nothing more is reported. The hypervisor's
    state file stays; ``restart(host)`` loads it into a fresh driver and agent.
    """

    database: Database
    tasks: ComputeTaskAPI
    endpoint: ComputeTaskEndpoint
    # The conductor's client of the agents (tests cap its version like an upgrade would).
    compute: ComputeAPI
    # The conductor's transport; each agent has its own (agent_config), the test driver too.
    transport: Transport
    cfg: FleetConfig
    driver_configs: dict[str, FakeDriverConfig]
    # Copied into every agent started (None: the agent's own defaults).
    agent_settings: LiveMigrationSettings | None
    agents: dict[str, ComputeAgentService] = dataclasses.field(default_factory=dict)
    crashed: dict[str, ComputeAgentService] = dataclasses.field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[RequestContext]:
        """An admin context with a unit of work on the conductor's database."""
        ctxt = RequestContext(user_id="admin", project_id="p1", caller=OPERATOR_LOGIN)
        async with self.database.request(ctxt):
            yield ctxt

    def driver(self, host: str) -> FakeDriver:
        driver = self.agents[host].driver
        assert isinstance(driver, FakeDriver)
        return driver

    async def start_agent(self, host: str, failures: str | None = None) -> ComputeAgentService:
        """Start ``host``'s agent on a fresh driver over the hypervisor's state file, as a
        (re)started process would; ``failures`` replaces the driver's injected failures."""
        config = self.driver_configs[host]
        if failures is not None:
            config = dataclasses.replace(config, failures=failures)
        # Its own transport and login (created and closed by the service), as a process has.
        agent = ComputeAgentService(agent_config(self.cfg, host), driver=FakeDriver(config))
        if self.agent_settings is not None:
            # One settings object is shared by the manager and its resolver: update in place.
            settings = agent.live_migration.settings
            for field in dataclasses.fields(self.agent_settings):
                setattr(settings, field.name, getattr(self.agent_settings, field.name))
        await agent.start()
        self.agents[host] = agent
        return agent

    async def restart_agent(self, host: str) -> ComputeAgentService:
        """Start ``host``'s agent again after ``stop``, with the failures it had."""
        return await self.start_agent(host)

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
        """Start a crashed agent again (without injected failures unless given)."""
        self.crashed.pop(host, None)
        return await self.start_agent(host, failures)

    async def flush(self) -> None:
        """Write every agent's pending resource usage now."""
        for agent in self.agents.values():
            await agent.run_as_agent(agent.tracker.flush())

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
        self.down = True
        asyncio.get_running_loop().call_later(seconds, setattr, self, "down", False)


async def copy_rounds(driver: FakeDriver, rounds: int = 3, within: float = 10.0) -> None:
    """Return once ``driver`` (a migration's source) has run ``rounds`` more rounds of its
    memory copy: evidence that a copy is under way, where a sleep would only hope so."""
    # A zero-second slowdown slows nothing but counts every round it sees.
    counter = driver.failures.delay("live_migration_copy", 0.0)
    try:
        await eventually(lambda: counter.fired >= rounds, within, what=f"{rounds} copy rounds")
    finally:
        counter.remaining = 0


@contextlib.asynccontextmanager
async def in_process_fleet(
    workdir: Path,
    hosts: tuple[str, ...] = ("host-a", "host-b"),
    *,
    vcpus: int = 8,
    memory_mb: int = 8192,
    disk_gb: int = 200,
    failures: Mapping[str, str] | None = None,
    migration: Mapping[str, MigrationModel] | MigrationModel | None = None,
    agent_settings: LiveMigrationSettings | None = None,
    conductor_settings: LiveMigrationTaskSettings | None = None,
    stop_grace: float = 5.0,
) -> AsyncIterator[InProcessFleet]:
    """A conductor on a fresh SQLite database in ``workdir`` and one agent per host.

    ``failures`` and ``migration`` (one model, or one per host) configure each fake hypervisor;
    ``agent_settings`` replaces the agents' live-migration settings, ``conductor_settings``
    the conductor's. ``FleetObject.indirection_api`` is restored at the end.
    """
    url = f"sqlite+aiosqlite:///{workdir}/fleet.db"
    await db_migration.upgrade(url)
    cfg = FleetConfig(host=CONDUCTOR_HOST)
    cfg.database.url = url
    cfg.messaging = memory_messaging()
    cfg.compute.spawn_delay = 0.0
    if conductor_settings is not None:
        # The conductor reads its live-migration options from the config, as a process does.
        for field in dataclasses.fields(conductor_settings):
            if field.name != "service_down_time":
                setattr(cfg.live_migration, field.name, getattr(conductor_settings, field.name))
    transport = party_transport(cfg, CONDUCTOR_LOGIN)
    operator = party_transport(cfg, OPERATOR_LOGIN)
    previous = FleetObject.indirection_api
    async with transport, operator:
        # The real conductor service, on the fleet's memory broker (as the agents are built).
        conductor = ConductorService(cfg, transport=transport)
        # One difference: calls to agents are capped by hand (``fleet.compute.set_version_cap``,
        # as a test pins an upgrade), not by the levels read from the services table.
        conductor.compute.levels = None
        await conductor.start()
        database, endpoint, compute = conductor.database, conductor.tasks, conductor.compute
        fleet = InProcessFleet(
            database,
            ComputeTaskAPI(operator, timeout=30),
            endpoint,
            compute,
            transport,
            cfg,
            {},
            agent_settings,
        )
        try:
            for host in hosts:
                model = migration.get(host) if isinstance(migration, Mapping) else migration
                fleet.driver_configs[host] = FakeDriverConfig(
                    state_dir=workdir / "virt",
                    vcpus=vcpus,
                    memory_mb=memory_mb,
                    local_gb=disk_gb,
                    ram_allocation_ratio=cfg.compute.ram_allocation_ratio,
                    spawn_delay_s=0.0,
                    failures=(failures or {}).get(host, ""),
                    migration=model or MigrationModel(),
                )
                await fleet.start_agent(host)
            yield fleet
        finally:
            for agent in fleet.agents.values():
                await agent.stop(grace=stop_grace)
            for agent in fleet.crashed.values():
                await agent.transport.close()  # a crashed agent's connection
            await conductor.stop(grace=stop_grace)
            FleetObject.indirection_api = previous
