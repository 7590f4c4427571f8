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

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, and_, bindparam, delete, func, insert, select, update

from conductor.db import asyncpg_exec, ownership
from conductor.db.connection import Build, RequestConnection
from conductor.db.where import Row, table_for, where_clause_for, where_shape
from shared_objects.base import DatabaseAPI, Increment


class DbApi(RequestConnection, DatabaseAPI):
    """Database access for one request (see module docstring)."""

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
