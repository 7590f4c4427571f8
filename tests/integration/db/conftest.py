"""The database suite runs on both backends: SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conductor.testing import LocalConductor, local_conductor


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of each backend in turn."""
    name = "sqlite_database_url" if request.param == "sqlite" else "pg_database_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def conductor(database_url: str) -> AsyncIterator[LocalConductor]:
    """A migrated database served by an in-process conductor; objects act as on an agent."""
    async with local_conductor(database_url) as local:
        yield local
