"""The database suite runs on both backends: SQLite (aiosqlite) and PostgreSQL (asyncpg).

The kit's ``conductor`` fixture serves ``database_url``, overridden here with both backends.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of each backend in turn."""
    name = "sqlite_database_url" if request.param == "sqlite" else "pg_database_url"
    return str(request.getfixturevalue(name))
