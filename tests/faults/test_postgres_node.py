"""The private PostgreSQL for database fault tests: isolated, restartable, killable, cleaned up."""

from __future__ import annotations

import asyncpg
import pytest

from shared_objects.testing import PostgresNode
from shared_objects.testing.postgres_node import postgres_available

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _need_postgres() -> None:
    missing = postgres_available()
    if missing is not None:
        pytest.skip(missing)


def _dsn(node: PostgresNode) -> str:
    return node.url.replace("postgresql+asyncpg://", "postgresql://")


async def _one(node: PostgresNode) -> int:
    conn = await asyncpg.connect(_dsn(node), timeout=5)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


async def test_private_postgres_restarts_survives_a_kill_and_leaves_nothing_behind() -> None:
    node = PostgresNode()
    async with node:
        assert node.port != 5432
        assert node.url.endswith(f":{node.port}/fleet")
        conn = await asyncpg.connect(_dsn(node), timeout=5)
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")

        await node.restart(down_for=0.5)
        # The server went away under the open connection: it is terminated, not hung.
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
        await conn.close()
        assert await _one(node) == 1

        await node.kill()
        with pytest.raises(OSError):
            await _one(node)
        await node.start()
        conn = await asyncpg.connect(_dsn(node), timeout=5)
        try:
            assert await conn.fetchval("SELECT n FROM kept") == 7
        finally:
            await conn.close()
        base = node.data_dir.parent
    assert not base.exists()
