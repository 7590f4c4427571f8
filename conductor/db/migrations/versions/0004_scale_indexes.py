"""indexes for a thousand hosts: the host view's delta reads and the reconciler's scans

Expand-only: indexes are added, nothing else changes, so conductors of the previous release
keep working on this schema (they simply do not use the new indexes).

- ``compute_nodes``, ``services``: ``coalesce(deleted_at, updated_at, created_at)``, the rows
  changed since the scheduler's host view last read them (``conductor.host_view``).
- ``instances``: ``coalesce(updated_at, created_at)`` of the instances with a task (partial),
  the reconciler's oldest-first scan of transitional instances.
- ``instance_actions``: ``id`` of the unfinished actions (partial), the reconciler's scan.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _changed_at() -> sa.ColumnElement[object]:
    return sa.func.coalesce(
        sa.column("deleted_at"), sa.column("updated_at"), sa.column("created_at")
    )


def upgrade() -> None:
    op.create_index("ix_compute_nodes_changed_at", "compute_nodes", [_changed_at()])
    op.create_index("ix_services_changed_at", "services", [_changed_at()])
    busy = sa.column("task_state").is_not(None)
    op.create_index(
        "ix_instances_busy_changed",
        "instances",
        [sa.func.coalesce(sa.column("updated_at"), sa.column("created_at"))],
        postgresql_where=busy,
        sqlite_where=busy,
    )
    still_open = sa.column("finish_time").is_(None)
    op.create_index(
        "ix_instance_actions_open",
        "instance_actions",
        ["id"],
        postgresql_where=still_open,
        sqlite_where=still_open,
    )


def downgrade() -> None:
    op.drop_index("ix_instance_actions_open", table_name="instance_actions")
    op.drop_index("ix_instances_busy_changed", table_name="instances")
    op.drop_index("ix_services_changed_at", table_name="services")
    op.drop_index("ix_compute_nodes_changed_at", table_name="compute_nodes")
