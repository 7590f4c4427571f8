"""release 1.1: instance locks, disk progress of migrations, 64-bit memory counters

Expand-only: columns are added (with defaults) or widened, nothing is dropped, so conductors
of release 1.0 keep working on this schema during the rolling upgrade.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MEMORY = ("memory_total", "memory_processed", "memory_remaining")
_DISK = ("disk_total", "disk_processed", "disk_remaining")


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("locked", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("locked_reason", sa.String(length=255), nullable=True))
    with op.batch_alter_table("migrations", schema=None) as batch_op:
        for name in _MEMORY:
            batch_op.alter_column(
                name, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True
            )
        for name in _DISK:
            batch_op.add_column(sa.Column(name, sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("migrations", schema=None) as batch_op:
        for name in _DISK:
            batch_op.drop_column(name)
        for name in _MEMORY:
            batch_op.alter_column(
                name, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True
            )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("locked_reason")
        batch_op.drop_column("locked")
