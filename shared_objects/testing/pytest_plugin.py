"""Fleet's test kit as a pytest plugin, registered by ``pytest_plugins`` in tests/conftest.py.

Fixtures (the plain helpers behind them are in ``isolation``, ``eventually`` and ``fleet``):

- ``amqp_vhost`` (session), ``amqp_url``: a RabbitMQ vhost private to the session.
- ``control_exchange``, ``unique_topic``: names private to one test.
- ``pg_database_url``, ``sqlite_database_url``: a fresh database for one test;
  ``database_url`` picks one (SQLite unless a test package overrides it).
- ``janitor``: deletes the queues and exchanges a test declared on the broker.
- ``conductor``: an in-process conductor on ``database_url`` (objects act as on an agent).
- ``fleet_factory`` / ``lm_fleet_factory``: an in-process fleet of N real agents (the second
  with live-migration timeouts short enough to expire in a test).
- ``wait_for``: ``eventually``, for tests that take it as a fixture.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from shared_objects.testing.broker import BrokerJanitor
from shared_objects.testing.eventually import eventually
from shared_objects.testing.isolation import AMQP_URL, fresh_database, private_vhost, vhost_url

if TYPE_CHECKING:  # the conductor and the agents are imported by the fixtures that use them
    from conductor.testing import LocalConductor
    from shared_objects.testing.fleet import InProcessFleet


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host private to this test session, deleted at the end.

    Two test sessions on one broker (two developers, or CI beside a developer) would otherwise
    share queues. ``""`` (the URL's own vhost) when ``rabbitmqctl`` cannot be used.
    """
    with private_vhost("fleet-test") as name:
        yield name


@pytest.fixture
def amqp_url(amqp_vhost: str) -> str:
    """Transport URL of the real broker (loopback only), in this session's private vhost."""
    if os.environ.get("FLEET_TEST_TRANSPORT_URL"):
        return AMQP_URL
    return vhost_url(amqp_vhost)


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
    async with fresh_database("fleet_test") as url:
        yield url


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    """A file-backed SQLite database for one test."""
    return f"sqlite+aiosqlite:///{tmp_path}/fleet.db"


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    """The database a ``conductor`` serves; a test package may override it (both backends)."""
    return sqlite_database_url


@pytest.fixture
async def janitor(amqp_url: str) -> AsyncIterator[BrokerJanitor]:
    """Deletes, after the test, the queues and exchanges it recorded (``server_topology``)."""
    janitor = BrokerJanitor(amqp_url)
    yield janitor
    await janitor.cleanup()


@pytest.fixture
async def conductor(database_url: str) -> AsyncIterator[LocalConductor]:
    """A migrated database served by an in-process conductor (``conductor.testing``);
    remotables go through it as on an agent."""
    from conductor.testing import local_conductor

    async with local_conductor(database_url) as local:
        yield local


FleetFactory = Callable[..., contextlib.AbstractAsyncContextManager["InProcessFleet"]]


@pytest.fixture
def fleet_factory(tmp_path: Path) -> FleetFactory:
    """``async with fleet_factory(hosts, ...) as fleet``: see ``fleet.in_process_fleet``."""
    from shared_objects.testing.fleet import in_process_fleet

    def make(
        hosts: tuple[str, ...] = ("host-a", "host-b"), **options: Any
    ) -> contextlib.AbstractAsyncContextManager[InProcessFleet]:
        return in_process_fleet(tmp_path, hosts, **options)

    return make


@pytest.fixture
def lm_fleet_factory(tmp_path: Path) -> FleetFactory:
    """A ``fleet_factory`` for live migration: short timeouts on agents and conductor."""
    from shared_objects.testing.fleet import (
        fast_live_migration,
        fast_live_migration_task,
        in_process_fleet,
    )

    def make(
        hosts: tuple[str, ...] = ("host-a", "host-b"),
        *,
        agent_settings: Any = None,
        conductor_settings: Any = None,
        **options: Any,
    ) -> contextlib.AbstractAsyncContextManager[InProcessFleet]:
        return in_process_fleet(
            tmp_path,
            hosts,
            agent_settings=agent_settings or fast_live_migration(),
            conductor_settings=conductor_settings or fast_live_migration_task(),
            stop_grace=2.0,
            **options,
        )

    return make


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``await wait_for(check, within)``: the kit's ``eventually``."""
    return eventually
