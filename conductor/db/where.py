"""Which ``where`` a lookup may use: every lookup must be able to use an index (its equality
columns include the first column of the primary key, of a unique constraint or of an index; a
filter on ``deleted`` alone is a deliberate full listing), and the clause built from its shape.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ARRAY, Column, ColumnElement, Table, and_, any_, bindparam, false, or_

from conductor.db import models
from shared_objects.base import AtLeast

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
