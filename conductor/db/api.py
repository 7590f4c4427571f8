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

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, delete, false, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conductor.db import models
from shared_objects.base import AtLeast, DatabaseAPI

Row = dict[str, Any]

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


def where_clause(table: Table, where: Mapping[str, Any]) -> ColumnElement[bool]:
    """Translate a ``DatabaseAPI`` where mapping into SQL, checking an index can serve it."""
    eq: set[str] = set()
    clauses: list[ColumnElement[bool]] = []
    for name, value in where.items():
        col = table.c[name]
        if isinstance(value, AtLeast):
            clauses.append(col >= value.value)
            continue
        eq.add(name)
        if value is None:
            clauses.append(col.is_(None))
        elif isinstance(value, (list, tuple, set, frozenset)):
            values = list(value)
            present = [v for v in values if v is not None]
            parts: list[ColumnElement[bool]] = []
            if present:
                parts.append(col.in_(present))
            if len(present) != len(values):
                parts.append(col.is_(None))
            clauses.append(or_(*parts) if parts else false())
        else:
            clauses.append(col == value)
    _check_indexed(table.name, frozenset(eq), frozenset(where))
    return and_(*clauses) if clauses else and_(True)


class DbApi(DatabaseAPI):
    """Database access for one request (see module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self.statements = 0

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self._engine.connect()
            try:
                await conn.begin()
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        self.statements += 1
        return self._conn

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

    async def get(
        self, table: str, where: Mapping[str, Any], *, columns: Sequence[str] | None = None
    ) -> Row | None:
        t = table_for(table)
        stmt = select(*self._cols(t, columns)).where(where_clause(t, where)).limit(1)
        result = await (await self._connection()).execute(stmt)
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
        t = table_for(table)
        order = [t.c[c].desc() if descending else t.c[c] for c in order_by]
        stmt = select(*self._cols(t, columns)).where(where_clause(t, where)).order_by(*order)
        if limit is not None:
            stmt = stmt.limit(limit)
        result = await (await self._connection()).execute(stmt)
        return [dict(r) for r in result.mappings()]

    async def insert(self, table: str, values: Mapping[str, Any]) -> Row:
        t = table_for(table)
        stmt = insert(t).values(dict(values)).returning(*t.c)
        result = await (await self._connection()).execute(stmt)
        return dict(result.mappings().one())

    async def update(
        self,
        table: str,
        where: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        returning: Sequence[str] | None = None,
    ) -> list[Row]:
        t = table_for(table)
        stmt = update(t).where(where_clause(t, where)).values(dict(values))
        conn = await self._connection()
        if returning is not None and not returning:
            result = await conn.execute(stmt)
            return [{} for _ in range(result.rowcount)]
        result = await conn.execute(stmt.returning(*self._cols(t, returning)))
        return [dict(r) for r in result.mappings()]

    async def delete(self, table: str, where: Mapping[str, Any]) -> int:
        t = table_for(table)
        result = await (await self._connection()).execute(delete(t).where(where_clause(t, where)))
        return int(result.rowcount)

    async def min_value(self, table: str, column: str, where: Mapping[str, Any]) -> Any:
        t = table_for(table)
        stmt = select(func.min(t.c[column])).where(where_clause(t, where))
        return (await (await self._connection()).execute(stmt)).scalar()
