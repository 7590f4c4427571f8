"""Fixtures shared by every test package: real service locations and per-run isolation.

Integration tests isolate themselves on the shared RabbitMQ and PostgreSQL: each test gets its own
control exchange name, each database test its own freshly created PostgreSQL database. Clusters
log every process in as its own broker user (``broker_logins``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conductor.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor
from shared_objects.testing.broker_logins import BrokerLogins

AMQP_URL = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
PG_ADMIN_DSN = os.environ.get(
    "FLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host private to this test session, deleted at the end.

    Queue names (``conductor``, ``compute.<host>``) do not depend on the control exchange, so
    two test sessions on one broker (two developers, or CI beside a developer) would share
    queues and steal each other's messages; a vhost per session isolates them completely.
    Falls back to the URL's own vhost when ``rabbitmqctl`` cannot be used.
    """
    name = f"fleet-test-{uuid.uuid4().hex[:10]}"
    ctl = shutil.which("rabbitmqctl")

    def ctl_run(*argv: str) -> bool:
        if ctl is None:
            return False
        done = subprocess.run([ctl, "-q", *argv], capture_output=True, timeout=60)
        return done.returncode == 0

    if not (
        ctl_run("add_vhost", name)
        and ctl_run("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    ):
        yield ""
        return
    try:
        yield name
    finally:
        ctl_run("delete_vhost", name)


# The hosts, conductors and operators most cluster tests use: created once per session in one
# batch; anything else is created on demand (also batched) when a cluster starts it.
SESSION_HOSTS = ("compute-1", "compute-2", "compute-3", "compute-old", "compute-new")
SESSION_CONDUCTORS = ("1", "2")


@pytest.fixture(scope="session")
def broker_logins(amqp_vhost: str) -> Iterator[BrokerLogins | None]:
    """Broker logins on the session's vhost: agents ``fleet-host-<tag>-<host>``, conductors
    ``fleet-conductor-<tag>-<n>``, the test driver ``fleet-operator-<tag>``; deleted at the end.

    The tag keeps two sessions on one broker apart (users are global, vhosts are not); clusters
    pass ``FLEET_SECURITY__HOST_LOGIN_PREFIX`` to their processes. Permissions cover the
    per-test control exchanges (``fleet-test-<12 hex>``); each cluster adds the topic
    permissions of its own. None when the session has no private vhost (no rabbitmqctl, or
    ``FLEET_TEST_TRANSPORT_URL`` names another broker): clusters then share that URL's login.
    """
    if not amqp_vhost or os.environ.get("FLEET_TEST_TRANSPORT_URL"):
        yield None
        return
    logins = _vhost_logins(amqp_vhost)
    asyncio.run(logins.ensure(conductors=SESSION_CONDUCTORS, operators=[""], hosts=SESSION_HOSTS))
    try:
        yield logins
    finally:
        asyncio.run(logins.delete())


def _vhost_logins(amqp_vhost: str) -> BrokerLogins:
    """A set of logins of its own (own tag) on the session's vhost."""
    return BrokerLogins(
        AMQP_URL.rstrip("/") + "/" + amqp_vhost,
        amqp_vhost,
        tag=uuid.uuid4().hex[:6],
        exchange_pattern=r"fleet-test-[0-9a-f]{12}",
    )


@pytest.fixture
def amqp_url(amqp_vhost: str) -> str:
    """Transport URL of the real broker (loopback only), in this session's private vhost."""
    if not amqp_vhost or os.environ.get("FLEET_TEST_TRANSPORT_URL"):
        return AMQP_URL
    return AMQP_URL.rstrip("/") + "/" + amqp_vhost


@pytest.fixture
def control_exchange() -> str:
    """A control exchange unique to this test, so parallel runs never see each other's traffic."""
    return f"fleet-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unique_topic() -> str:
    return f"topic-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def pg_database_url() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test (asyncpg URL); dropped afterwards."""
    import asyncpg

    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
def sqlite_database_url(tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A file-backed SQLite database for one test."""
    yield f"sqlite+aiosqlite:///{tmp_path}/fleet.db"


# A real cluster per test: conductor and agents as separate processes on the real RabbitMQ and
# a fresh PostgreSQL database (integration, fault and upgrade tests).
ClusterFactory = Callable[..., contextlib.AbstractAsyncContextManager[LocalCluster]]


@pytest.fixture
def cluster_factory(
    pg_database_url: str,
    amqp_url: str,
    control_exchange: str,
    tmp_path: Path,
    amqp_vhost: str,
    broker_logins: BrokerLogins | None,
) -> ClusterFactory:
    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[LocalCluster]:
        common_env = {"FLEET_COMPUTE__SPAWN_DELAY": "0.05"}
        common_env.update(overrides.pop("common_env", {}))
        logins = overrides.pop("logins", broker_logins)
        own_logins: BrokerLogins | None = None
        if (
            logins is broker_logins
            and broker_logins is not None
            and (overrides.get("agent_source") or overrides.get("legacy_shared_login"))
        ):
            # Agents of an older release widen the rights of EVERY agent login of their
            # BrokerLogins while it holds them (write on amq.default, which reaches any queue
            # by name: their replies need it). On the session's logins that would outlast this
            # test and let later tests' hosts publish there (tests/security proves they
            # cannot); logins of its own are deleted with the cluster.
            own_logins = logins = _vhost_logins(amqp_vhost)
        spec = ClusterSpec(
            # A test on a private PostgreSQL (shared_objects.testing.PostgresNode) passes its own.
            database_url=overrides.pop("database_url", pg_database_url),
            transport_url=amqp_url,
            control_exchange=control_exchange,
            workdir=tmp_path / "cluster",
            common_env=common_env,
            logins=logins,
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
            try:
                codes = await cluster.stop()
            finally:
                if own_logins is not None:
                    await own_logins.delete()
            bad = {n: c for n, c in codes.items() if c not in (0, None, -9)}
            assert not bad, f"processes exited uncleanly: {bad}"

    return make
