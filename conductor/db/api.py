"""The conductor's implementation of ``shared_objects.base.DatabaseAPI`` (``context.db``).

One ``DbApi`` serves one request: it takes a pooled connection on the first query, runs every
statement of the request in one transaction, and is committed (or rolled back) by
``Database.request`` when the request ends. Statements are SQLAlchemy Core over the typed
models' tables: one statement per lookup or write, no ORM unit of work on the hot path.

Every ``where`` must be able to use an index: its equality columns must include the first
column of the primary key, of a unique constraint or of an index (a filter on ``deleted`` alone
is a deliberate full listing). A lookup without one is a programming error, refused loudly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import asyncpg.transaction
import structlog
from sqlalchemy import (
    ARRAY,
    Column,
    ColumnElement,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from conductor.db import asyncpg_exec, models, ownership
from conductor.db.ownership import OwnerScope
from shared_objects import exception
from shared_objects.base import AtLeast, DatabaseAPI, Increment

Row = dict[str, Any]

log = structlog.get_logger(__name__)

# Columns that may filter a query without leading an index (low selectivity flags).
_FILTER_ONLY = frozenset({"deleted"})


class UnindexedQuery(RuntimeError):
    """A lookup whose columns lead no index: add the index (and a migration) first."""


class UnknownTable(KeyError):
    """A table name that is not part of the schema."""


def _leading_columns(table: Table) -> frozenset[str]:
    lead: set[str] = set()
    pk = list(table.primary_key.columns)
    if pk:
        lead.add(pk[0].name)
    for index in table.indexes:
        # An index on an expression, or a partial one, serves only the queries written for
        # it (``conductor.host_view``, ``conductor.reconcile``), not a lookup by its columns.
        first = index.expressions[0] if index.expressions else None
        partial = any(
            index.dialect_kwargs.get(f"{d}_where") is not None for d in ("postgresql", "sqlite")
        )
        if isinstance(first, Column) and not partial:
            lead.add(first.name)
    for col in table.columns:
        if col.unique:
            lead.add(col.name)
    return frozenset(lead)


@functools.cache
def _check_indexed(
    table_name: str, eq_columns: frozenset[str], all_columns: frozenset[str]
) -> None:
    table = models.metadata.tables[table_name]
    if not (all_columns - _FILTER_ONLY):
        return
    if eq_columns & _leading_columns(table):
        return
    raise UnindexedQuery(
        f"query on {table_name} by {sorted(all_columns)} can use no index "
        f"(indexes lead with {sorted(_leading_columns(table))})"
    )


def table_for(name: str) -> Table:
    try:
        return models.metadata.tables[name]
    except KeyError:
        raise UnknownTable(name) from None


# How one ``where`` entry filters: the shape is part of a statement's cache key, the value a
# bound parameter.
_EQ, _NULL, _IN, _IN_OR_NULL, _NOTHING, _AT_LEAST = "eq", "null", "in", "in|null", "none", "ge"

Shape = tuple[tuple[str, str], ...]


def where_shape(table: Table, where: Mapping[str, Any]) -> tuple[Shape, dict[str, Any]]:
    """Split a ``DatabaseAPI`` where mapping into a statement shape and its parameters, after
    checking that an index can serve the lookup."""
    shape: list[tuple[str, str]] = []
    params: dict[str, Any] = {}
    eq: set[str] = set()
    for name, value in where.items():
        if name not in table.c:
            raise KeyError(f"{table.name} has no column {name!r}")
        key = f"w_{name}"
        if isinstance(value, AtLeast):
            shape.append((name, _AT_LEAST))
            params[key] = value.value
            continue
        eq.add(name)
        if value is None:
            shape.append((name, _NULL))
        elif isinstance(value, (list, tuple, set, frozenset)):
            present = [v for v in value if v is not None]
            has_null = len(present) != len(value)
            if present:
                shape.append((name, _IN_OR_NULL if has_null else _IN))
                params[key] = present
            else:
                shape.append((name, _NULL if has_null else _NOTHING))
        else:
            shape.append((name, _EQ))
            params[key] = value
    _check_indexed(table.name, frozenset(eq), frozenset(where))
    return tuple(shape), params


def where_clause_for(table: Table, shape: Shape, *, arrays: bool = False) -> ColumnElement[bool]:
    """The SQL condition of a where shape, with bound parameters named ``w_<column>``.

    ``arrays``: membership as ``col = ANY(:array)`` (PostgreSQL) instead of an expanding
    ``IN``, so the statement text does not depend on the list's length and compiles once.
    """
    clauses: list[ColumnElement[bool]] = []
    for name, mode in shape:
        col = table.c[name]
        key = f"w_{name}"
        if mode in (_IN, _IN_OR_NULL):
            member = (
                col == any_(bindparam(key, type_=ARRAY(col.type)))
                if arrays
                else col.in_(bindparam(key, expanding=True, type_=col.type))
            )
            clauses.append(member if mode == _IN else or_(member, col.is_(None)))
        elif mode == _EQ:
            clauses.append(col == bindparam(key, type_=col.type))
        elif mode == _NULL:
            clauses.append(col.is_(None))
        elif mode == _AT_LEAST:
            clauses.append(col >= bindparam(key, type_=col.type))
        else:
            clauses.append(false())
    return and_(*clauses) if clauses else and_(True)


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


class DbApi(DatabaseAPI):
    """Database access for one request (see module docstring)."""

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

    @staticmethod
    def _cols(table: Table, columns: Sequence[str] | None) -> list[Any]:
        return list(table.c) if columns is None else [table.c[c] for c in columns]

    def _select(
        self,
        t: Table,
        where: Mapping[str, Any],
        columns: Sequence[str] | None,
        order_by: Sequence[str],
        descending: bool,
        limit: int | None,
        owned: ownership.Condition | None = None,
    ) -> tuple[tuple[Any, ...], Build, dict[str, Any]]:
        shape, params = where_shape(t, where)
        cols = tuple(columns) if columns is not None else None
        key: tuple[Any, ...] = ("select", t.name, shape, cols, tuple(order_by), descending, limit)
        if owned is not None:
            key = (*key, "owned")
            params.update(self._scope_params)

        def build(arrays: bool) -> Any:
            order = [t.c[c].desc() if descending else t.c[c] for c in order_by]
            condition = where_clause_for(t, shape, arrays=arrays)
            if owned is not None:
                condition = and_(condition, owned(t, ownership.Sql(arrays)))
            stmt = select(*self._cols(t, cols)).where(condition).order_by(*order)
            return stmt.limit(limit) if limit is not None else stmt

        return key, build, params

    def _readable(self, t: Table, op: str) -> ownership.Condition | None:
        """The scope's read condition on ``t`` (None: unscoped, or every row is readable)."""
        if self._scope is None:
            return None
        return ownership.read_condition(self._scope, t.name, op)

    async def _refuse_if_found(self, t: Table, where: Mapping[str, Any], op: str) -> None:
        """After a scoped statement found or changed nothing: ``Forbidden`` if the same lookup
        without the scope finds a row (the failure path only; nothing was changed)."""
        assert self._scope is not None
        first = next(iter(t.primary_key.columns)).name
        key, build, params = self._select(t, where, (first,), (), False, 1)
        if await self._run(t, key, build, params, rows=True):
            raise ownership.forbidden(self._scope, op, t.name, ownership.describe(where))

    async def get(
        self, table: str, where: Mapping[str, Any], *, columns: Sequence[str] | None = None
    ) -> Row | None:
        t = table_for(table)
        owned = self._readable(t, "get")
        key, build, params = self._select(t, where, columns, (), False, 1, owned)
        found: list[Row] = await self._run(t, key, build, params, rows=True)
        if found:
            return found[0]
        if owned is not None:
            await self._refuse_if_found(t, where, "get")
        return None

    async def select(
        self,
        table: str,
        where: Mapping[str, Any],
        *,
        columns: Sequence[str] | None = None,
        order_by: Sequence[str] = ("id",),
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Row]:
        """Under a scope: only the rows it may read. A listing never says ``Forbidden`` for
        the others; a lookup of one row (``limit=1``, the newest of something) does, like
        ``get``, when it finds nothing the caller may read but the row exists."""
        t = table_for(table)
        owned = self._readable(t, "select")
        key, build, params = self._select(t, where, columns, order_by, descending, limit, owned)
        found: list[Row] = await self._run(t, key, build, params, rows=True)
        if not found and owned is not None and limit == 1:
            await self._refuse_if_found(t, where, "get")
        return found

    async def insert(self, table: str, values: Mapping[str, Any]) -> Row:
        t = table_for(table)
        for name in values:
            if name not in t.c:
                raise KeyError(f"{t.name} has no column {name!r}")
        if self._scope is not None:
            plan = ownership.plan_insert(self._scope, t.name, values)
            if plan.condition is not None:
                return await self._insert_guarded(t, values, plan)
        params = dict(values)
        column_keys: tuple[str, ...] = ()
        if self._driver_path:
            # The driver path fills Python-side defaults itself, so the statement's columns
            # are known when it is compiled. A default only SQLAlchemy's execution can compute
            # (callable, sequence) is refused loudly: the schema has none, and one added later
            # must be given a value here first.
            filled = asyncpg_exec.scalar_defaults(t, params)
            if filled is None:
                raise NotImplementedError(f"{t.name} has a non-scalar column default")
            params = filled
            column_keys = tuple(sorted(params))
        key = ("insert", t.name, column_keys)
        found: list[Row] = await self._run(
            t,
            key,
            lambda _arrays: insert(t).returning(*t.c),
            params,
            rows=True,
            write=True,
            column_keys=column_keys,
        )
        if len(found) != 1:
            raise RuntimeError(f"insert into {t.name} returned {len(found)} rows")
        return found[0]

    async def _insert_guarded(
        self, t: Table, values: Mapping[str, Any], plan: ownership.WritePlan
    ) -> Row:
        """``INSERT INTO t (...) SELECT :values WHERE <guard>``: the ownership check and the
        insert are one statement; a refused insert inserts nothing and is ``Forbidden``."""
        assert self._scope is not None and plan.condition is not None
        # Python-side defaults are filled here on both paths: the columns must be listed.
        filled = asyncpg_exec.scalar_defaults(t, values)
        if filled is None:
            raise NotImplementedError(f"{t.name} has a non-scalar column default")
        names = tuple(sorted(filled))
        params = {f"v_{n}": v for n, v in filled.items()}
        params.update(self._scope_params)
        params.update(plan.params)
        guard = plan.condition

        def build(arrays: bool) -> Any:
            row = select(*(bindparam(f"v_{n}", type_=t.c[n].type) for n in names)).where(
                guard(t, ownership.Sql(arrays))
            )
            return insert(t).from_select([t.c[n] for n in names], row).returning(*t.c)

        found: list[Row] = await self._run(
            t, ("insert_owned", t.name, names, plan.key), build, params, rows=True, write=True
        )
        if len(found) != 1:
            target = ", ".join(f"{k[2:]}={v!r}" for k, v in plan.params.items())
            raise ownership.forbidden(self._scope, "insert into", t.name, target)
        return found[0]

    async def update(
        self,
        table: str,
        where: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        returning: Sequence[str] | None = None,
        standalone: bool = False,
    ) -> list[Row]:
        """Under a scope, a write of a column or value the scope may not write is ``Forbidden``
        before any statement; an update that matches no row the scope may write is
        ``Forbidden`` if it would have matched one without the scope, else ``[]`` as usual
        (a compare-and-swap that failed on the caller's own row)."""
        t = table_for(table)
        shape, params = where_shape(t, where)
        names = tuple(values)
        increments = tuple(n for n in names if isinstance(values[n], Increment))
        for name in names:
            if name not in t.c:
                raise KeyError(f"{t.name} has no column {name!r}")
            value = values[name]
            params[f"v_{name}"] = value.by if isinstance(value, Increment) else value
        ret = tuple(returning) if returning is not None else None
        key: tuple[Any, ...] = ("update", t.name, shape, names, increments, ret)
        owned: ownership.Condition | None = None
        if self._scope is not None:
            plan = ownership.plan_update(self._scope, t.name, where, values)
            owned = plan.condition
            key = (*key, "owned", plan.key)
            params.update(self._scope_params)
            params.update(plan.params)

        def build(arrays: bool) -> Any:
            def new_value(n: str) -> Any:
                param = bindparam(f"v_{n}", type_=t.c[n].type)
                return t.c[n] + param if n in increments else param

            condition = where_clause_for(t, shape, arrays=arrays)
            if owned is not None:
                condition = and_(condition, owned(t, ownership.Sql(arrays)))
            stmt = update(t).where(condition).values({t.c[n]: new_value(n) for n in names})
            return stmt if ret == () else stmt.returning(*self._cols(t, ret))

        if ret == ():
            count: int = await self._run(
                t, key, build, params, rows=False, write=True, standalone=standalone
            )
            if count == 0 and owned is not None:
                await self._refuse_if_found(t, where, "update")
            return [{} for _ in range(count)]
        found: list[Row] = await self._run(
            t, key, build, params, rows=True, write=True, standalone=standalone
        )
        if not found and owned is not None:
            await self._refuse_if_found(t, where, "update")
        return found

    async def delete(self, table: str, where: Mapping[str, Any]) -> int:
        """Under a scope: ``Forbidden`` (no agent deletes rows; soft deletes are updates)."""
        t = table_for(table)
        shape, params = where_shape(t, where)
        if self._scope is not None:
            raise ownership.forbidden(self._scope, "delete from", t.name, ownership.describe(where))
        count: int = await self._run(
            t,
            ("delete", t.name, shape),
            lambda arrays: delete(t).where(where_clause_for(t, shape, arrays=arrays)),
            params,
            rows=False,
            write=True,
        )
        return count

    async def run_statement(
        self,
        key: tuple[Any, ...],
        table: str,
        build: Build,
        params: Mapping[str, Any],
        *,
        rows: bool,
        write: bool = False,
    ) -> Any:
        """Run a prebuilt Core statement (a batched read or compare-and-swap of the conductor's
        own periodic work, ``conductor.reconcile``): its rows as dicts (``rows``) or the number
        of rows it touched. ``key`` names the statement's shape (its compiled form is cached
        under it); ``build(arrays)`` makes it (``arrays`` as in ``where_clause_for``).

        Never under an ownership scope: these statements carry no agent's conditions.
        """
        t = table_for(table)
        if self._scope is not None:
            raise ownership.forbidden(self._scope, "run", t.name, str(key[:2]))
        return await self._run(t, ("prebuilt", *key), build, dict(params), rows=rows, write=write)

    async def min_value(self, table: str, column: str, where: Mapping[str, Any]) -> Any:
        """Under a scope: the minimum over the rows it may read."""
        t = table_for(table)
        shape, params = where_shape(t, where)
        owned = self._readable(t, "read")
        key: tuple[Any, ...] = ("min", t.name, column, shape)
        if owned is not None:
            key = (*key, "owned")
            params.update(self._scope_params)

        def build(arrays: bool) -> Any:
            condition = where_clause_for(t, shape, arrays=arrays)
            if owned is not None:
                condition = and_(condition, owned(t, ownership.Sql(arrays)))
            return select(func.min(t.c[column]).label("min_value")).where(condition)

        found: list[Row] = await self._run(t, key, build, params, rows=True)
        return found[0]["min_value"] if found else None
