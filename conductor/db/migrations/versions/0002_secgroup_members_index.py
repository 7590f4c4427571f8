"""index security group memberships by group (refreshing a group's members)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("security_group_instance_association", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_security_group_instance_association_security_group_id"),
            ["security_group_id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("security_group_instance_association", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_security_group_instance_association_security_group_id"))
