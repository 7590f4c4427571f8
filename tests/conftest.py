"""Fixtures shared by every test package: the test kit, broker logins and real clusters.

Integration tests isolate themselves on the shared RabbitMQ and PostgreSQL with the kit's
fixtures (``shared_objects.testing.pytest_plugin``): a private vhost per session, a control
exchange per test, a freshly created PostgreSQL database per database test. Clusters log every
process in as its own broker user (``broker_logins``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import AMQP_URL, vhost_url
from shared_objects.testing.rabbit_node import RabbitNode

# The kit: private vhost, fresh databases, janitor, eventually, in-process conductor and fleet.
pytest_plugins = ["shared_objects.testing.pytest_plugin"]


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
        vhost_url(amqp_vhost, AMQP_URL),
        amqp_vhost,
        tag=uuid.uuid4().hex[:6],
        exchange_pattern=r"fleet-test-[0-9a-f]{12}",
    )


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
        transport_url = amqp_url
        # A private broker node (fault tests that restart or kill it): its URL, its logins.
        node: RabbitNode | None = overrides.pop("node", None)
        if node is not None:
            transport_url, logins = node.url, BrokerLogins.for_node(node)
        # Fault tests stop a cluster that lived through broker faults: exits are not the point.
        check_exits = overrides.pop("check_exits", True)
        # A LocalCluster subclass (tests/integration/ops: conductors with metrics ports).
        cluster_class: Callable[[ClusterSpec], LocalCluster] = overrides.pop(
            "cluster_class", LocalCluster
        )
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
            transport_url=transport_url,
            control_exchange=control_exchange,
            workdir=tmp_path / "cluster",
            common_env=common_env,
            logins=logins,
            **overrides,
        )
        cluster = cluster_class(spec)
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
            assert not (bad and check_exits), f"processes exited uncleanly: {bad}"

    return make
