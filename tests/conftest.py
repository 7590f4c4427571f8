"""Fixtures shared by every test package: real service locations and per-run isolation.

Integration tests isolate themselves on the shared RabbitMQ and PostgreSQL: each test gets its own
control exchange name, each database test its own freshly created PostgreSQL database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

AMQP_URL = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
PG_ADMIN_DSN = os.environ.get(
    "FLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def amqp_url() -> str:
    """Transport URL of the real broker (loopback only)."""
    return AMQP_URL


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
