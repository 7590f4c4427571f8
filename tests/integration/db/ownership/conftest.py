"""Fixtures of the ownership tests: each runs on SQLite, on PostgreSQL through the asyncpg driver
path and on PostgreSQL through SQLAlchemy's execution, in a world of two hosts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from ownership_world import H1, H2, REQ, World, _create, _side

from conductor.db import migration
from conductor.db.session import Database
from shared_objects import releases
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Service


@pytest.fixture(params=["sqlite", "pg-driver", "pg-sqlalchemy"])
def backend(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """A fresh database URL and whether to use the asyncpg driver path."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_database_url")), False
    return str(request.getfixturevalue("pg_database_url")), request.param == "pg-driver"


@pytest.fixture
async def database(backend: tuple[str, bool]) -> AsyncIterator[Database]:
    url, driver_path = backend
    await migration.upgrade(url)
    database = Database(url, driver_path=driver_path)
    assert database.driver_path is driver_path
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def world(database: Database) -> World:
    ctxt = RequestContext(request_id=REQ, user_id="u1", project_id="p1")
    async with database.request(ctxt):
        flavor = await _create(Flavor(ctxt, name="small", vcpus=1, memory_mb=512, root_gb=1))
        mine = await _side(ctxt, flavor, H1)
        theirs = await _side(ctxt, flavor, H2)
        conductor_service = await Service.register(
            ctxt, H1, releases.BINARY_CONDUCTOR, "conductor", 1
        )
    return World(database, flavor, mine, theirs, conductor_service)
