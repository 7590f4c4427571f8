"""The reconciler's SQL: the batched reads of one pass and its batched compare-and-swaps.

Each function runs one statement through ``DbApi.run_statement`` (compiled once per shape). A
read returns at most ``limit`` rows whatever the fleet's size; a write names its candidates
(``uuid = ANY(:uuids)``) *and* repeats the rule's condition, so a row that changed since the read
(its agent came back, another conductor acted first) is left alone: two conductors running the
same pass at once each change a row at most once between them. On PostgreSQL the second
``UPDATE`` waits for the first one's row lock and re-checks its ``WHERE`` on the new row version.

``reads.py`` holds the reads, ``writes.py`` the compare-and-swaps, ``tables.py`` what they share;
callers use them as ``statements.<name>``.
"""

from __future__ import annotations

from conductor.reconcile.statements.reads import (
    build_attempts,
    compute_services,
    open_actions,
    stale_migrations,
    transitional_instances,
)
from conductor.reconcile.statements.writes import (
    close_events,
    delete_bdms,
    fail_builds_on_down_hosts,
    finish_actions,
    finish_actions_of,
    finish_deletes_on_down_hosts,
    record_faults,
    release_migrated_instances,
    settle_migrations,
)

__all__ = [
    "build_attempts",
    "close_events",
    "compute_services",
    "delete_bdms",
    "fail_builds_on_down_hosts",
    "finish_actions",
    "finish_actions_of",
    "finish_deletes_on_down_hosts",
    "open_actions",
    "record_faults",
    "release_migrated_instances",
    "settle_migrations",
    "stale_migrations",
    "transitional_instances",
]
