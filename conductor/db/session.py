"""The conductor's database: the async engine and the per-request unit of work."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from conductor.db.api import POOL_BORN_KEY, DbApi, PoolHealth, uses_driver_path
from conductor.db.ownership import OwnerScope


def quiet_statement_logging() -> None:
    """Keep SQLAlchemy from logging every statement.

    SQLAlchemy treats its engine logger being enabled for INFO as ``echo=True``: one log line
    per statement floods the service log and costs CPU on every query. Statement logging is for
    debugging (``echo=True`` on a throwaway engine), never for a running conductor.
    """
    for name in ("sqlalchemy.engine", "sqlalchemy.engine.Engine"):
        logging.getLogger(name).setLevel(logging.WARNING)


# The task holding the SQLite unit (tasks started inside a unit inherit the value, but they are
# other tasks: they wait for the lock instead of being refused).
_SQLITE_UNIT_OWNER: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "sqlite_unit_owner", default=None
)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def create_engine(url: str, *, pool_size: int = 64, max_overflow: int = 0) -> AsyncEngine:
    """An async engine for ``url`` (``postgresql+asyncpg://`` or ``sqlite+aiosqlite://``).

    SQLite gets one shared connection: it allows a single writer anyway, and one connection
    turns concurrent requests into a queue instead of ``database is locked`` errors.

    PostgreSQL: the pool keeps up to ``pool_size`` connections, opened on demand and then kept:
    the default matches the RPC server's 64 concurrent handlers, because overflow connections
    (opened and closed again per burst) cost the conductor a third of its throughput at c=64.
    asyncpg tries TLS first on every new connection by default; on a loopback host with no
    ``ssl``/``sslmode`` in the URL that attempt is skipped. TLS stays configuration: put
    ``?ssl=require`` (or ``verify-full`` ...) in ``FLEET_DATABASE_URL``.
    """
    quiet_statement_logging()
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = max_overflow
        # No pre-ping: it costs a round trip per request; a dead connection fails the request,
        # is invalidated by SQLAlchemy, and the next checkout gets a fresh one.
        kwargs["pool_recycle"] = 3600
        query = {k.lower() for k in parsed.query}
        if parsed.host in LOOPBACK_HOSTS and not query & {"ssl", "sslmode"}:
            kwargs["connect_args"] = {"ssl": False}
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _remember_birth(_dbapi_conn: Any, record: Any) -> None:
        # Read by PoolHealth: connections opened before a connection loss are dropped.
        record.info[POOL_BORN_KEY] = time.monotonic()

    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


class Database:
    """Owns the engine; hands out one ``DbApi`` per request."""

    def __init__(
        self, url: str, *, engine: AsyncEngine | None = None, driver_path: bool | None = None
    ) -> None:
        """``driver_path``: run statements on the asyncpg connection directly
        (``conductor.db.asyncpg_exec``); default: whenever the URL is PostgreSQL via asyncpg.
        ``False`` keeps every statement on SQLAlchemy's execution (tests compare the two)."""
        self.url = url
        # Logging may have been configured after the module was imported: quiet it again.
        quiet_statement_logging()
        self.engine = engine if engine is not None else create_engine(url)
        self.driver_path = uses_driver_path(self.engine) if driver_path is None else driver_path
        if self.driver_path and not uses_driver_path(self.engine):
            raise ValueError(f"the driver path needs postgresql+asyncpg, not {url!r}")
        self.health = PoolHealth()
        self._sqlite = make_url(url).get_backend_name() == "sqlite"
        self._sqlite_lock: asyncio.Lock | None = None

    @asynccontextmanager
    async def request(
        self,
        context: Any = None,
        *,
        single_call: bool = False,
        scope: OwnerScope | None = None,
    ) -> AsyncIterator[DbApi]:
        """A unit of work: sets ``context.db`` for the request, commits when it ends cleanly,
        rolls back when it raises, always returns the connection to the pool.

        ``single_call``: the unit serves exactly one remotable call (the indirection endpoint),
        so a ``standalone`` write may commit on its own. Any other caller gets full atomicity:
        everything written in the block commits or rolls back together.

        ``scope``: every statement of the unit runs under that ownership scope (an agent's
        call: ``conductor.db.ownership``); a refusal raises ``Forbidden`` and, like any error,
        rolls the unit back. None (the default): unrestricted.
        """
        if self._sqlite:
            # One shared connection: requests must take turns, whole transactions at a time.
            # A unit opened inside another one in the same task would wait for itself forever.
            if _SQLITE_UNIT_OWNER.get() is asyncio.current_task():
                raise RuntimeError(
                    "nested Database.request() on SQLite would deadlock: reuse the outer "
                    "unit's context (its context.db) instead"
                )
            if self._sqlite_lock is None:
                self._sqlite_lock = asyncio.Lock()
            async with self._sqlite_lock:
                token = _SQLITE_UNIT_OWNER.set(asyncio.current_task())
                try:
                    async with self._unit(context, single_call, scope) as db:
                        yield db
                finally:
                    _SQLITE_UNIT_OWNER.reset(token)
        else:
            async with self._unit(context, single_call, scope) as db:
                yield db

    @asynccontextmanager
    async def _unit(
        self, context: Any, single_call: bool, scope: OwnerScope | None
    ) -> AsyncIterator[DbApi]:
        db = DbApi(
            self.engine,
            allow_standalone=single_call,
            driver_path=self.driver_path,
            health=self.health,
            scope=scope,
        )
        previous = getattr(context, "db", None) if context is not None else None
        if context is not None:
            context.db = db
        try:
            try:
                yield db
            except BaseException:
                await db.rollback()
                raise
            await db.commit()
        finally:
            await db.close()
            if context is not None:
                context.db = previous

    async def dispose(self) -> None:
        await self.engine.dispose()
