"""Which lookups ``DbApi`` takes as indexed: an index on an expression or a partial index
serves only the statements written for it, never a plain lookup by one of its columns."""

from __future__ import annotations

import datetime

import pytest

from conductor.db import models
from conductor.db.where import UnindexedQuery, where_shape

T = models.metadata.tables
NOW = datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("compute_nodes", "deleted_at"),  # leads ix_compute_nodes_changed_at (an expression)
        ("services", "deleted_at"),
        ("instances", "updated_at"),  # ix_instances_busy_changed: expression and partial
    ],
)
def test_a_lookup_by_a_column_of_an_expression_index_is_refused(table: str, column: str) -> None:
    with pytest.raises(UnindexedQuery):
        where_shape(T[table], {column: NOW})


def test_lookups_by_leading_columns_of_plain_indexes_pass() -> None:
    where_shape(T["services"], {"host": "h", "binary": "b"})
    where_shape(T["compute_nodes"], {"host": "h"})
    where_shape(T["instance_actions"], {"id": 1})
