"""Run SQLAlchemy Core statements on the pooled asyncpg connection itself (PostgreSQL only).

SQLAlchemy builds and compiles every statement and owns the pool; this module only skips its
per-execution machinery (greenlet hop, execution context, cursor adapter, result wrapper), which
costs more CPU than the query: measured on the development machine, a primary-key SELECT through
``AsyncConnection.execute`` takes ~575 µs of conductor CPU, the same compiled SQL on the driver
~180 µs (ANCHORS.md: raw asyncpg does 3.3x the updates/s of SQLAlchemy Core).

A statement is compiled once per shape into ``AsyncpgStatement``: the ``$n`` SQL text, the
parameter order, the bind processors SQLAlchemy would apply (JSON serialisation, boolean
checks) and the values of literal binds (``LIMIT``). asyncpg prepares and caches the statement
per connection. Results come back as dicts keyed by column name; the dialect's JSON codecs
(installed by SQLAlchemy on every new connection) decode JSON columns, and the remaining column
types need no result processing on asyncpg (``tests/integration/db/test_asyncpg_exec.py``
compares both paths over every table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy import Table
from sqlalchemy.engine import Dialect

Row = dict[str, Any]

# Errors that mean the connection is gone (server restarted, backend killed, socket closed):
# the request's first statement may be retried on a fresh connection.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    # The protocol is still consuming a previous failure (e.g. the server's FATAL shutdown
    # notice on a connection it is closing): the connection is unusable.
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
)


@dataclasses.dataclass(frozen=True, slots=True)
class AsyncpgStatement:
    """One compiled statement shape, ready for ``asyncpg.Connection.fetch`` / ``execute``."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    literals: Mapping[str, Any]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        for name, proc in zip(self.names, self.processors, strict=True):
            value = params[name] if name in params else self.literals[name]
            out.append(proc(value) if proc is not None and value is not None else value)
        return out


def compile_statement(
    stmt: Any, dialect: Dialect, column_keys: Sequence[str] | None = None
) -> AsyncpgStatement:
    """Compile ``stmt`` for asyncpg (``numeric_dollar`` parameters) once."""
    compiled = stmt.compile(dialect=dialect, column_keys=list(column_keys or ()) or None)
    by_name = {name: bind for bind, name in compiled.bind_names.items()}
    names = tuple(compiled.positiontup or ())
    processors = []
    literals: dict[str, Any] = {}
    for name in names:
        bind = by_name[name]
        processors.append(bind.type.dialect_impl(dialect).bind_processor(dialect))
        if not bind.required:
            literals[name] = bind.value
    return AsyncpgStatement(compiled.string, names, tuple(processors), literals)


def scalar_defaults(table: Table, given: Mapping[str, Any]) -> dict[str, Any] | None:
    """``given`` plus the table's scalar Python-side defaults for the columns it leaves out, as
    SQLAlchemy would fill them in at execution; None if a missing column has a default that only
    SQLAlchemy's execution can compute (callable, sequence, SQL expression)."""
    values = dict(given)
    for col in table.columns:
        if col.name in values or col.default is None:
            continue
        if not col.default.is_scalar:
            return None
        values[col.name] = col.default.arg  # type: ignore[attr-defined]
    return values


async def fetch(
    conn: asyncpg.Connection, stmt: AsyncpgStatement, params: Mapping[str, Any]
) -> list[Row]:
    return [dict(r) for r in await conn.fetch(stmt.sql, *stmt.args(params))]


async def execute(
    conn: asyncpg.Connection, stmt: AsyncpgStatement, params: Mapping[str, Any]
) -> int:
    """Run a statement without rows; the number of rows it touched (from the command tag)."""
    status = await conn.execute(stmt.sql, *stmt.args(params))
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
