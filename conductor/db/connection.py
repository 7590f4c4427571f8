"""One request's database connection and transaction (the base of ``DbApi``), and the built
statements it runs, cached by shape.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import asyncpg.transaction
import structlog
from sqlalchemy import Table
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from conductor.db import asyncpg_exec
from conductor.db.ownership import OwnerScope
from conductor.db.pool import PoolHealth, _invalidate_and_close
from shared_objects import exception

log = structlog.get_logger(__name__)


# Built statements by (operation, table, shape, ...): SQLAlchemy then finds their compiled form
# in its cache without rebuilding and re-hashing the expression tree on every request. The
# driver path keeps its own compiled forms (``asyncpg_exec.AsyncpgStatement``).
_STATEMENTS: dict[tuple[Any, ...], Any] = {}
_DRIVER_STATEMENTS: dict[tuple[Any, ...], asyncpg_exec.AsyncpgStatement] = {}

# Builds a statement; ``arrays`` as in ``where_clause_for``.
Build = Callable[[bool], Any]


def _cached(key: tuple[Any, ...], build: Build) -> Any:
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = _STATEMENTS[key] = build(False)
    return stmt


def _conflict(table: Table, reason: str, cause: BaseException) -> exception.DatabaseConflict:
    """A constraint violation (unique key, foreign key, NOT NULL) as ``DatabaseConflict``, an
    error agents can catch by class, instead of a driver error they cannot import."""
    err = exception.DatabaseConflict(table=table.name, reason=reason.splitlines()[0])
    err.__cause__ = cause
    return err


class RequestConnection:
    """One request's connection and transaction, on the SQLAlchemy path or the asyncpg driver
    path: taken on the first statement, committed, rolled back or discarded once."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        allow_standalone: bool = False,
        driver_path: bool = False,
        health: PoolHealth | None = None,
        scope: OwnerScope | None = None,
    ) -> None:
        """``scope``: run every statement under that ownership scope (an agent's call,
        ``conductor.db.ownership``); None: unrestricted (conductors' and operators' own work)."""
        self._engine = engine
        self._scope = scope
        self._scope_params = scope.params() if scope is not None else {}
        self._health = health if health is not None else PoolHealth()
        # Only a unit serving one remotable call may commit a standalone write on its own.
        self._allow_standalone = allow_standalone
        self._driver_path = driver_path
        # SQLAlchemy path: the request's connection. Driver path: the pooled connection
        # (checked out without an AsyncConnection around it) and its asyncpg connection.
        self._conn: AsyncConnection | None = None
        self._fairy: PoolProxiedConnection | None = None
        self._driver: asyncpg.Connection | None = None
        self._transaction: asyncpg.transaction.Transaction | None = None
        # Set while a driver call runs: a request interrupted there (cancelled) leaves the
        # connection in an unknown protocol state, so it is discarded instead of pooled.
        self._driver_busy = False
        self._in_transaction = False
        self.statements = 0

    @property
    def _connected(self) -> bool:
        return self._conn is not None or self._driver is not None

    async def _connection(self, *, write: bool = False, standalone: bool = False) -> Any:
        """The request's connection; its transaction starts at the first write.

        Reads before the first write run in autocommit: under READ COMMITTED every statement
        takes its own snapshot anyway, and a plain SELECT takes no lock, so an enclosing
        transaction would only add two round trips (BEGIN, COMMIT) to every read-only request.
        From the first write on, everything up to the end of the request is one transaction.
        A ``standalone`` write (atomic on its own, the request's last) outside a transaction
        runs in autocommit too: one round trip instead of three.

        Returns the ``AsyncConnection`` (SQLAlchemy path) or the ``asyncpg.Connection``.
        """
        if standalone and self._allow_standalone and not self._in_transaction:
            write = False
        self.statements += 1
        if self._driver_path:
            if self._driver is None:
                await self._checkout_driver()
            if write and not self._in_transaction:
                await self._begin_driver_transaction()
            return self._driver
        conn = self._conn
        if conn is None:
            conn = await self._engine.connect()
            try:
                if write:
                    await conn.begin()
                    self._in_transaction = True
                else:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        elif write and not self._in_transaction:
            # Leave autocommit: end SQLAlchemy's (empty) autobegun transaction, restore the
            # dialect's isolation level, then start the real transaction.
            await conn.commit()
            await conn.execution_options(
                isolation_level=self._engine.dialect.default_isolation_level
            )
            await conn.begin()
            self._in_transaction = True
        return conn

    async def _checkout_driver(self) -> None:
        """A pooled asyncpg connection opened after the last connection loss (bounded: each
        stale one is invalidated, so the pool reconnects it on its next checkout).

        SQLAlchemy never executes on it, so its adapter never opens a transaction: the driver
        stays in autocommit until ``_begin_driver_transaction``. The pool is SQLAlchemy's;
        its calls run in one greenlet hop each (checkout here, checkin in ``close``).
        """
        pool = self._engine.sync_engine.pool
        for _ in range(pool.size() + 1):  # type: ignore[attr-defined]
            fairy = await greenlet_spawn(pool.connect)
            # A connection already closed under us (the server ended it) is dropped like one
            # opened before the last loss.
            driver = fairy.driver_connection
            if not self._health.stale(fairy.info) and driver is not None and not driver.is_closed():
                break
            await greenlet_spawn(_invalidate_and_close, fairy)
        self._fairy = fairy
        self._driver = fairy.driver_connection

    async def _begin_driver_transaction(self) -> None:
        assert self._driver is not None
        transaction = self._driver.transaction()
        self._driver_busy = True
        await transaction.start()
        self._driver_busy = False
        self._transaction = transaction
        self._in_transaction = True

    async def _run(
        self,
        table: Table,
        key: tuple[Any, ...],
        build: Build,
        params: dict[str, Any],
        *,
        rows: bool,
        write: bool = False,
        standalone: bool = False,
        column_keys: Sequence[str] | None = None,
    ) -> Any:
        """Run one statement: its rows as dicts (``rows``) or the number of rows it touched.

        If the request's *first* statement finds its pooled connection dead (database
        restarted, connection killed), it is retried once on a fresh connection: nothing of the
        request has happened yet, so the retry is safe; a later failure is the request's error
        (its transaction is gone with the connection). This replaces the pool's pre-ping, which
        cost a round trip on every request.
        """
        first = not self._connected
        once = functools.partial(
            self._run_once, table, key, build, params, rows, write, standalone, column_keys
        )
        try:
            return await once()
        except DBAPIError as exc:
            if not (first and exc.connection_invalidated):
                raise
            lost: BaseException = exc
        except asyncpg_exec.CONNECTION_LOST as exc:
            if not first:
                raise
            lost = exc
        log.warning("db_connection_lost_retrying", error=str(lost)[:200])
        self._health.mark_lost()
        await self._discard()
        return await once()

    async def _run_once(
        self,
        table: Table,
        key: tuple[Any, ...],
        build: Build,
        params: dict[str, Any],
        rows: bool,
        write: bool,
        standalone: bool,
        column_keys: Sequence[str] | None,
    ) -> Any:
        conn = await self._connection(write=write, standalone=standalone)
        if not self._driver_path:
            try:
                result = await conn.execute(_cached(key, build), params)
            except IntegrityError as exc:
                raise _conflict(table, str(exc.orig or exc), exc) from exc
            return [dict(r) for r in result.mappings()] if rows else result.rowcount
        stmt = _DRIVER_STATEMENTS.get(key)
        if stmt is None:
            stmt = asyncpg_exec.compile_statement(build(True), self._engine.dialect, column_keys)
            _DRIVER_STATEMENTS[key] = stmt
        self._driver_busy = True
        try:
            if rows:
                out: Any = await asyncpg_exec.fetch(conn, stmt, params)
            else:
                out = await asyncpg_exec.execute(conn, stmt, params)
        except asyncpg.IntegrityConstraintViolationError as exc:
            self._driver_busy = False
            raise _conflict(table, str(exc), exc) from exc
        except asyncpg.PostgresError as exc:
            # The server answered with an error: the connection itself is fine, unless the
            # error is the server ending the session (busy stays set: discarded on close).
            if not isinstance(exc, asyncpg_exec.CONNECTION_LOST):
                self._driver_busy = False
            raise
        self._driver_busy = False
        return out

    async def _discard(self) -> None:
        """Drop the request's connection for good (the pool opens a new one in its place)."""
        conn, self._conn = self._conn, None
        fairy, self._fairy = self._fairy, None
        self._driver = None
        self._transaction = None
        self._driver_busy = False
        self._in_transaction = False
        if conn is not None:
            with contextlib.suppress(DBAPIError, *asyncpg_exec.CONNECTION_LOST):
                await conn.invalidate()
            await conn.close()
        if fairy is not None:
            await greenlet_spawn(_invalidate_and_close, fairy)

    async def commit(self) -> None:
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            self._driver_busy = True
            await transaction.commit()
            self._driver_busy = False
        elif self._conn is not None:
            await self._conn.commit()

    async def rollback(self) -> None:
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            if self._driver_busy:
                # A call was interrupted: the connection is discarded on close, and the server
                # rolls the transaction back when it goes.
                return
            self._driver_busy = True
            try:
                await transaction.rollback()
            except (asyncpg.InterfaceError, *asyncpg_exec.CONNECTION_LOST):
                # The connection is unusable (busy, closed): discarded on close all the same.
                return
            self._driver_busy = False
        elif self._conn is not None:
            await self._conn.rollback()

    async def close(self) -> None:
        driver, fairy = self._driver, self._fairy
        if fairy is not None and driver is not None:
            if self._driver_busy or driver.is_in_transaction():
                # Interrupted mid-call or mid-transaction: never hand this connection out again.
                await self._discard()
                return
            self._fairy = self._driver = None
            self._in_transaction = False
            await greenlet_spawn(fairy.close)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._in_transaction = False
            await conn.close()
