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
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import structlog
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
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

from conductor.db import models
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
        cols = list(index.columns)
        if cols:
            lead.add(cols[0].name)
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


def where_clause_for(table: Table, shape: Shape) -> ColumnElement[bool]:
    """The SQL condition of a where shape, with bound parameters named ``w_<column>``."""
    clauses: list[ColumnElement[bool]] = []
    for name, mode in shape:
        col = table.c[name]
        key = f"w_{name}"
        if mode == _EQ:
            clauses.append(col == bindparam(key, type_=col.type))
        elif mode == _NULL:
            clauses.append(col.is_(None))
        elif mode == _IN:
            clauses.append(col.in_(bindparam(key, expanding=True, type_=col.type)))
        elif mode == _IN_OR_NULL:
            clauses.append(
                or_(col.in_(bindparam(key, expanding=True, type_=col.type)), col.is_(None))
            )
        elif mode == _AT_LEAST:
            clauses.append(col >= bindparam(key, type_=col.type))
        else:
            clauses.append(false())
    return and_(*clauses) if clauses else and_(True)


# Built statements by (operation, table, shape, ...): SQLAlchemy then finds their compiled form
# in its cache without rebuilding and re-hashing the expression tree on every request.
_STATEMENTS: dict[tuple[Any, ...], Any] = {}


def _cached(key: tuple[Any, ...], build: Any) -> Any:
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = _STATEMENTS[key] = build()
    return stmt


@contextlib.asynccontextmanager
async def _conflicts(table: Table) -> AsyncIterator[None]:
    """A constraint violation (unique key, foreign key, NOT NULL) becomes ``DatabaseConflict``,
    an error agents can catch by class, instead of a driver error they cannot import."""
    try:
        yield
    except IntegrityError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
        raise exception.DatabaseConflict(table=table.name, reason=reason) from exc


class DbApi(DatabaseAPI):
    """Database access for one request (see module docstring)."""

    def __init__(self, engine: AsyncEngine, *, allow_standalone: bool = False) -> None:
        self._engine = engine
        # Only a unit serving one remotable call may commit a standalone write on its own.
        self._allow_standalone = allow_standalone
        self._conn: AsyncConnection | None = None
        self._in_transaction = False
        self.statements = 0

    async def _connection(
        self, *, write: bool = False, standalone: bool = False
    ) -> AsyncConnection:
        """The request's connection; its transaction starts at the first write.

        Reads before the first write run in autocommit: under READ COMMITTED every statement
        takes its own snapshot anyway, and a plain SELECT takes no lock, so an enclosing
        transaction would only add two round trips (BEGIN, COMMIT) to every read-only request.
        From the first write on, everything up to the end of the request is one transaction.
        A ``standalone`` write (atomic on its own, the request's last) outside a transaction
        runs in autocommit too: one round trip instead of three.
        """
        if standalone and self._allow_standalone and not self._in_transaction:
            write = False
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
        self.statements += 1
        return conn

    async def _execute(
        self, stmt: Any, params: Any, *, write: bool = False, standalone: bool = False
    ) -> Any:
        """Run one statement; if the request's *first* statement finds its pooled connection
        dead (database restarted, connection killed), retry it once on a fresh connection.

        Nothing of the request has happened yet at that point, so the retry is safe; a later
        failure is the request's error (its transaction is gone with the connection). This
        replaces the pool's pre-ping, which cost a round trip on every request.
        """
        first = self._conn is None
        conn = await self._connection(write=write, standalone=standalone)
        try:
            return await conn.execute(stmt, params)
        except DBAPIError as exc:
            if not (first and exc.connection_invalidated):
                raise
            log.warning("db_connection_lost_retrying", error=str(exc.orig)[:200])
            await self._discard()
            conn = await self._connection(write=write, standalone=standalone)
            return await conn.execute(stmt, params)

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        self._in_transaction = False
        if conn is not None:
            with contextlib.suppress(DBAPIError):
                await conn.invalidate()
            await conn.close()

    async def commit(self) -> None:
        if self._conn is not None:
            await self._conn.commit()

    async def rollback(self) -> None:
        if self._conn is not None:
            await self._conn.rollback()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
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
    ) -> tuple[Any, dict[str, Any]]:
        shape, params = where_shape(t, where)
        cols = tuple(columns) if columns is not None else None
        key = ("select", t.name, shape, cols, tuple(order_by), descending, limit)

        def build() -> Any:
            order = [t.c[c].desc() if descending else t.c[c] for c in order_by]
            stmt = select(*self._cols(t, cols)).where(where_clause_for(t, shape)).order_by(*order)
            return stmt.limit(limit) if limit is not None else stmt

        return _cached(key, build), params

    async def get(
        self, table: str, where: Mapping[str, Any], *, columns: Sequence[str] | None = None
    ) -> Row | None:
        stmt, params = self._select(table_for(table), where, columns, (), False, 1)
        result = await self._execute(stmt, params)
        row = result.mappings().first()
        return dict(row) if row is not None else None

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
        stmt, params = self._select(table_for(table), where, columns, order_by, descending, limit)
        result = await self._execute(stmt, params)
        return [dict(r) for r in result.mappings()]

    async def insert(self, table: str, values: Mapping[str, Any]) -> Row:
        t = table_for(table)
        for name in values:
            if name not in t.c:
                raise KeyError(f"{t.name} has no column {name!r}")
        stmt = _cached(("insert", t.name), lambda: insert(t).returning(*t.c))
        async with _conflicts(t):
            result = await self._execute(stmt, dict(values), write=True)
        return dict(result.mappings().one())

    async def update(
        self,
        table: str,
        where: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        returning: Sequence[str] | None = None,
        standalone: bool = False,
    ) -> list[Row]:
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
        key = ("update", t.name, shape, names, increments, ret)

        def build() -> Any:
            def new_value(n: str) -> Any:
                param = bindparam(f"v_{n}", type_=t.c[n].type)
                return t.c[n] + param if n in increments else param

            stmt = (
                update(t)
                .where(where_clause_for(t, shape))
                .values({t.c[n]: new_value(n) for n in names})
            )
            return stmt if ret == () else stmt.returning(*self._cols(t, ret))

        stmt = _cached(key, build)
        async with _conflicts(t):
            result = await self._execute(stmt, params, write=True, standalone=standalone)
        if ret == ():
            return [{} for _ in range(result.rowcount)]
        return [dict(r) for r in result.mappings()]

    async def delete(self, table: str, where: Mapping[str, Any]) -> int:
        t = table_for(table)
        shape, params = where_shape(t, where)
        stmt = _cached(
            ("delete", t.name, shape), lambda: delete(t).where(where_clause_for(t, shape))
        )
        async with _conflicts(t):
            result = await self._execute(stmt, params, write=True)
        return int(result.rowcount)

    async def min_value(self, table: str, column: str, where: Mapping[str, Any]) -> Any:
        t = table_for(table)
        shape, params = where_shape(t, where)
        stmt = _cached(
            ("min", t.name, column, shape),
            lambda: select(func.min(t.c[column])).where(where_clause_for(t, shape)),
        )
        return (await self._execute(stmt, params)).scalar()
