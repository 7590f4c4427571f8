"""The PostgreSQL driver path (``conductor/db/asyncpg_exec.py``) against SQLAlchemy's execution.

Both paths run the same ``DbApi`` calls on one PostgreSQL database; every row they return must
be identical, over every table, including JSON, booleans, timestamps, Python-side defaults,
``ANY`` membership, increments, ``RETURNING`` and row counts. Also: constraint violations keep
their error class, and a request interrupted mid-statement never hands a broken connection on.
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conductor.db import migration
from conductor.db.session import Database
from shared_objects import exception
from shared_objects.base import AtLeast, Increment
from shared_objects.context import RequestContext
from shared_objects.testing.eventually import eventually

NOW = datetime.datetime(2026, 11, 25, 9, 30, 1, 123456, tzinfo=datetime.UTC)


@pytest.fixture
async def databases(pg_database_url: str) -> AsyncIterator[tuple[Database, Database]]:
    await migration.upgrade(pg_database_url)
    driver = Database(pg_database_url)
    plain = Database(pg_database_url, driver_path=False)
    assert driver.driver_path and not plain.driver_path
    try:
        yield driver, plain
    finally:
        await driver.dispose()
        await plain.dispose()


def _sample(table: str, n: int) -> dict[str, Any]:
    """A row for ``table`` using every column type the table has."""
    base: dict[str, dict[str, Any]] = {
        "flavors": {
            "flavorid": f"f{n}",
            "name": f"flavor-{n}",
            "vcpus": 2,
            "memory_mb": 512,
            "root_gb": 1,
            "extra_specs": {"hw:cpu_policy": "dedicated", "n": 1, "nested": [1, None]},
            "created_at": NOW,
        },
        "instances": {
            "uuid": str(uuid.uuid4()),
            "name": f"vm-{n}",
            "host": "h1",
            "vm_state": "active",
            "flavor": {"name": "small", "vcpus": 1},
            "launched_at": NOW,
            "deleted": False,
        },
        "services": {"host": f"h{n}", "binary": "fleet-compute", "topic": "compute"},
    }
    return dict(base.get(table))


async def test_both_paths_read_and_write_identically(
    databases: tuple[Database, Database],
) -> None:
    driver, plain = databases
    results: dict[str, list[Any]] = {"driver": [], "plain": []}
    for n, (label, database) in enumerate((("driver", driver), ("plain", plain))):
        out = results[label]
        async with database.request(RequestContext()) as db:
            flavor = await db.insert("flavors", _sample("flavors", n))
            inst = await db.insert("instances", _sample("instances", n))
            service = await db.insert("services", _sample("services", n))
        out.append({k: v for k, v in flavor.items() if k not in ("id", "flavorid", "name")})
        out.append({k: v for k, v in inst.items() if k not in ("id", "uuid", "name")})
        out.append({k: v for k, v in service.items() if k not in ("id", "host")})
        async with database.request(RequestContext(), single_call=True) as db:
            got = await db.get("instances", {"uuid": inst["uuid"]})
            assert got == inst
            listed = await db.select(
                "instances", {"uuid": [inst["uuid"], "nope", None], "deleted": False}
            )
            assert listed == [inst]
            assert await db.select("instances", {"uuid": []}) == []
            later = await db.select(
                "instances", {"host": "h1", "updated_at": AtLeast(NOW)}, columns=["uuid"]
            )
            assert later == []
            changed = await db.update(
                "services",
                {"id": service["id"]},
                {"report_count": Increment(3), "last_seen_up": NOW, "disabled": True},
                returning=["report_count", "last_seen_up", "disabled"],
                standalone=True,
            )
            out.append(changed)
        async with database.request(RequestContext()) as db:
            assert await db.update(
                "instances", {"uuid": inst["uuid"]}, {"progress": 7}, returning=()
            ) == [{}]
            assert (
                await db.update("instances", {"uuid": "missing"}, {"progress": 7}, returning=())
                == []
            )
            assert await db.min_value("services", "version", {"binary": "fleet-compute"}) == 0
            assert await db.delete("instances", {"uuid": [inst["uuid"]]}) == 1
    assert results["driver"] == results["plain"]


async def test_rows_written_on_the_driver_path_read_the_same_on_sqlalchemys(
    databases: tuple[Database, Database],
) -> None:
    """Whatever the driver path wrote (JSON, booleans, timestamps, Python-side defaults),
    SQLAlchemy's execution reads back identically, and the other way round."""
    driver, plain = databases
    for n, writer in enumerate((driver, plain)):
        async with writer.request(RequestContext()) as db:
            for table in ("flavors", "instances", "services"):
                await db.insert(table, _sample(table, 90 + n))
    for table in ("flavors", "instances", "services"):
        async with driver.request(RequestContext()) as a, plain.request(RequestContext()) as b:
            rows_a = await a.select(table, {"deleted": False} if table != "flavors" else {})
            rows_b = await b.select(table, {"deleted": False} if table != "flavors" else {})
        assert len(rows_a) == 2
        assert rows_a == rows_b, table


async def test_constraint_violations_stay_database_conflicts(
    databases: tuple[Database, Database],
) -> None:
    driver, _ = databases
    async with driver.request(RequestContext()) as db:
        await db.insert("flavors", _sample("flavors", 5))
    with pytest.raises(exception.DatabaseConflict):
        async with driver.request(RequestContext()) as db:
            await db.insert("flavors", _sample("flavors", 5))
    # Nothing half-done is left behind, and the pool still serves.
    async with driver.request(RequestContext()) as db:
        assert len(await db.select("flavors", {"name": "flavor-5"})) == 1


async def test_a_request_cancelled_mid_statement_does_not_poison_the_pool(
    databases: tuple[Database, Database],
) -> None:
    driver, _ = databases

    async def slow() -> None:
        async with driver.request(RequestContext()) as db:
            await db.insert("flavors", _sample("flavors", 7))
            assert db._driver is not None
            await db._driver.execute("SELECT pg_sleep(5)")

    task = asyncio.create_task(slow())

    async def in_pg_sleep() -> bool:
        # The query is running on the server: the cancel hits it, not the insert before it.
        async with driver.engine.connect() as conn:
            running = await conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'"
            )
            return bool(running.scalar())

    await eventually(in_pg_sleep, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every later request works and the cancelled insert was rolled back.
    for _ in range(driver.engine.sync_engine.pool.size() + 2):  # type: ignore[attr-defined]
        async with asyncio.timeout(10), driver.request(RequestContext()) as db:
            assert await db.select("flavors", {"name": "flavor-7"}) == []
