"""The campaign's world: a private broker, a private PostgreSQL, a TCP proxy, and one Fleet
cluster per fault (its own vhost, database, control exchange and workdir).

Everything is owned by an ``AsyncExitStack``, so a failure, a timeout or Ctrl-C (a cancellation)
unwinds it all: processes stopped (SIGKILL if they do not stop), node and server stopped, temp
directories removed. Nothing here touches the shared RabbitMQ or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from conductor.db.session import Database
from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor
from shared_objects.testing import RabbitNode, TcpProxy
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.postgres_node import PostgresNode

HOSTS = ("compute-1", "compute-2", "compute-3")
#: The agent whose broker connection goes through the TCP proxy (the partition fault's victim).
PROXIED_HOST = "compute-3"
CONDUCTORS = 2

# Detect a dead broker link within seconds (the partition fault), not a minute; give up on a
# lost request after 20 s rather than 60 s, so what a fault strands can be cleaned up (e.g. an
# attach whose message died with the broker) within the recovery window.
FAST_FAILURE_DETECTION = {
    "FLEET_MESSAGING__HEARTBEAT": "4",
    "FLEET_MESSAGING__RPC_RESPONSE_TIMEOUT": "20",
}
# The conductors' reconciler acts within the recovery window (its defaults are minutes, sized
# for production): stranded builds re-cast, rescheduled or failed, deletes and migrations on dead
# hosts finished, actions left open settled, all seconds after the fault.
FAST_RECONCILER = {
    "FLEET_CONDUCTOR__RECONCILE_INTERVAL": "2",
    "FLEET_CONDUCTOR__BUILD_RECAST_AFTER": "10",
    "FLEET_CONDUCTOR__BUILD_RESCHEDULE_AFTER": "20",
    "FLEET_CONDUCTOR__UNASSIGNED_BUILD_AFTER": "10",
    "FLEET_CONDUCTOR__BUILD_HOST_DOWN_AFTER": "5",
    "FLEET_CONDUCTOR__DELETE_RECAST_AFTER": "10",
    "FLEET_CONDUCTOR__DELETE_HOST_DOWN_AFTER": "15",
    "FLEET_CONDUCTOR__MIGRATION_HOSTS_DOWN_AFTER": "15",
    "FLEET_CONDUCTOR__ACTION_SETTLE_AFTER": "15",
}
# A pre-copy that takes a few seconds (512 MB at 200 MB/s, little dirtying): long enough to
# kill an agent in the middle of it, short enough for a campaign.
MIGRATION_MODEL = "bandwidth_mb_s=200,dirty_rate_mb_s=10,round_interval_s=0.05"


@dataclasses.dataclass
class Settings:
    """What every cluster of the campaign looks like."""

    spawn_delay: float = 1.0
    report_interval: float = 1.0
    service_down_time: float = 6.0
    start_timeout: float = 90.0
    stop_timeout: float = 30.0


class Infrastructure:
    """The services shared by every fault of a campaign (all private, all loopback)."""

    def __init__(self, workdir: Path | None = None) -> None:
        """``workdir``: where the clusters' logs and hypervisor state go (kept afterwards);
        None: a temp directory removed at the end."""
        self._keep = workdir is not None
        self.workdir = workdir
        self.node: RabbitNode | None = None
        self.postgres: PostgresNode | None = None
        self.proxy: TcpProxy | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Infrastructure:
        try:
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="fleet-campaign-"))
                self._stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
            self.workdir.mkdir(parents=True, exist_ok=True)
            # Started together: each takes seconds on its own.
            node, postgres = RabbitNode(), PostgresNode()
            await asyncio.gather(
                self._stack.enter_async_context(node),
                self._stack.enter_async_context(postgres),
            )
            self.node, self.postgres = node, postgres
            self.proxy = await self._stack.enter_async_context(TcpProxy(node.port))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def admin_dsn(self) -> str:
        """asyncpg DSN of the private server's own database (where the others are created)."""
        assert self.postgres is not None
        return self.postgres.url.replace("postgresql+asyncpg://", "postgresql://")

    @contextlib.asynccontextmanager
    async def database(self, name: str) -> AsyncIterator[str]:
        """A new database on the private server (SQLAlchemy URL); dropped afterwards."""
        await _admin(self.admin_dsn, f'CREATE DATABASE "{name}"')
        try:
            assert self.postgres is not None
            yield self.postgres.url_for(database=name)
        finally:
            # The server may be down (a fault, or Ctrl-C reached it too): the database then
            # goes with the server's files, and this cleanup must not hide why we got here.
            await _quietly(_admin(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    @contextlib.asynccontextmanager
    async def vhost(self, name: str) -> AsyncIterator[str]:
        """A vhost on the private node (queue names are fixed: a fresh vhost means no stale
        queue or message of an earlier cluster); deleted afterwards."""
        assert self.node is not None
        await self.node.ctl("add_vhost", name)
        try:
            yield name
        finally:
            with contextlib.suppress(Exception):
                # The node may be down (a broker fault that never came back): it goes anyway.
                await self.node.ctl("delete_vhost", name, within=30)


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncio.wait_for(asyncpg.connect(dsn), 30)
    try:
        await asyncio.wait_for(conn.execute(statement), 60)
    finally:
        await conn.close()


@dataclasses.dataclass
class Phase:
    """One fault's cluster and what the checks need to reach it."""

    name: str
    cluster: LocalCluster
    vhost: str
    database_url: str
    database: Database  # the checker's own connection pool (never through a conductor)
    infra: Infrastructure

    @property
    def node(self) -> RabbitNode:
        assert self.infra.node is not None
        return self.infra.node

    @property
    def proxy(self) -> TcpProxy:
        assert self.infra.proxy is not None
        return self.infra.proxy

    @property
    def hypervisors(self) -> Path:
        return self.cluster.workdir / "hypervisors"

    async def restore(self) -> None:
        """Undo what a fault may have left: paused processes resumed, dead ones started,
        the proxy healed (the next checks expect the whole fleet back)."""
        self.proxy.heal()
        for name in list(self.cluster.processes):
            self.cluster.resume_process(name)
        for name, handle in list(self.cluster.processes.items()):
            if handle.running:
                continue
            if name.startswith("conductor-"):
                await self.cluster.restart_conductor(int(name.rsplit("-", 1)[1]))
            else:
                await self.cluster.restart_agent(name)


@contextlib.asynccontextmanager
async def phase_cluster(
    infra: Infrastructure, name: str, settings: Settings
) -> AsyncIterator[Phase]:
    """A fresh 3-agent, 2-conductor cluster for one fault, torn down (always) afterwards."""
    assert infra.node is not None and infra.proxy is not None and infra.workdir is not None
    tag = uuid.uuid4().hex[:8]
    async with contextlib.AsyncExitStack() as stack:
        vhost = await stack.enter_async_context(infra.vhost(f"campaign-{tag}"))
        db_url = await stack.enter_async_context(infra.database(f"campaign_{tag}"))
        logins = BrokerLogins.for_node(infra.node, vhost, tag=tag)
        stack.push_async_callback(_quietly, logins.delete())
        spec = ClusterSpec(
            database_url=db_url,
            transport_url=infra.node.url.rstrip("/") + f"/{vhost}",
            hosts=HOSTS,
            conductors=CONDUCTORS,
            workdir=infra.workdir / f"{name}-{tag}",
            common_env={
                "FLEET_COMPUTE__SPAWN_DELAY": str(settings.spawn_delay),
                **FAST_FAILURE_DETECTION,
                **FAST_RECONCILER,
            },
            agent_env={host: {"FLEET_COMPUTE__MIGRATION": MIGRATION_MODEL} for host in HOSTS},
            report_interval=settings.report_interval,
            service_down_time=settings.service_down_time,
            logins=logins,
            agent_broker_port={PROXIED_HOST: infra.proxy.port},
        )
        cluster = LocalCluster(spec)
        stack.push_async_callback(_stop_cluster, cluster, settings.stop_timeout)
        await cluster.start(timeout=settings.start_timeout)
        await Flavor(
            cluster.ctxt, name="small", flavorid="small", vcpus=1, memory_mb=512, root_gb=1
        ).create()
        database = Database(db_url)
        stack.push_async_callback(database.engine.dispose)
        yield Phase(name, cluster, vhost, db_url, database, infra)


async def _stop_cluster(cluster: LocalCluster, timeout: float) -> None:
    for name in list(cluster.processes):
        cluster.resume_process(name)  # a stopped process would ignore SIGTERM
    try:
        await asyncio.wait_for(cluster.stop(), timeout + 15)
    except TimeoutError:
        for name in list(cluster.processes):
            await cluster.kill_process(name)
        raise


def honour_cancellation() -> None:
    """Re-raise a cancellation (Ctrl-C) that something below swallowed or replaced by its own
    error (a cleanup failing because the services are going away too)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _quietly(step: Any) -> None:
    """Cleanup that must not hide the error that got us here (the broker may be gone)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(step, 60)
