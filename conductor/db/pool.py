"""The conductor's connection pool as ``DbApi`` sees it: which path a statement takes (the
asyncpg driver path on PostgreSQL) and the pool's health (connections born, discarded).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection

from conductor.db import asyncpg_exec


def _invalidate_and_close(fairy: PoolProxiedConnection) -> None:
    """Drop a pooled connection (runs in SQLAlchemy's greenlet: closing awaits the driver)."""
    with contextlib.suppress(DBAPIError, *asyncpg_exec.CONNECTION_LOST):
        fairy.invalidate()
    fairy.close()


def uses_driver_path(engine: AsyncEngine) -> bool:
    """Whether ``DbApi`` runs statements on the asyncpg connection directly (see
    ``asyncpg_exec``): PostgreSQL through asyncpg. SQLite goes through SQLAlchemy."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


POOL_BORN_KEY = "fleet_born"


class PoolHealth:
    """When a pooled connection was last found dead, shared by all requests of one engine.

    A dead connection usually means the server restarted, so every connection pooled before
    then is dead too: the driver path drops each such connection at checkout (the pool records
    when each connection was opened, under ``POOL_BORN_KEY``) instead of failing one request
    per dead connection. SQLAlchemy's own execution does the same internally.
    """

    def __init__(self) -> None:
        self.lost_at = 0.0

    def stale(self, connection_info: Mapping[str, Any]) -> bool:
        # A connection opened without the pool's "connect" hook has no birth: never stale.
        return float(connection_info.get(POOL_BORN_KEY, math.inf)) < self.lost_at

    def mark_lost(self) -> None:
        self.lost_at = time.monotonic()
