"""The conductor's database schema as typed SQLAlchemy 2 models.

Queries are SQLAlchemy Core statements over these tables (``conductor.db.api``); the models are
the single schema definition that migrations are checked against. Every lookup the objects make
has an index here (``api`` refuses lookups whose columns lead no index).
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations and autogenerate agree on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UTCDateTime = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Timestamps:
    created_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)


def changed_at(table: Any) -> Any:
    """When a soft-deletable row last changed: its deletion, else its last update, else its
    creation (``save`` sets ``updated_at``, ``create`` only ``created_at``, ``destroy`` only
    ``deleted_at``). The scheduler's host view reads the rows changed since its last read by
    this expression, and an index on it serves that read."""
    return func.coalesce(table.c.deleted_at, table.c.updated_at, table.c.created_at)


def last_stamp(table: Any) -> Any:
    """When a row last changed, ignoring deletion (the reconciler's age of a row)."""
    return func.coalesce(table.c.updated_at, table.c.created_at)


class SoftDelete(Timestamps):
    deleted_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class Flavor(Timestamps, Base):
    __tablename__ = "flavors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flavorid: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    root_gb: Mapped[int] = mapped_column(Integer)
    ephemeral_gb: Mapped[int] = mapped_column(Integer, default=0)
    swap: Mapped[int] = mapped_column(Integer, default=0)
    is_public: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    extra_specs: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Instance(SoftDelete, Base):
    __tablename__ = "instances"
    __table_args__ = (Index(None, "host", "node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str | None] = mapped_column(String(255))
    user_id: Mapped[str | None] = mapped_column(String(255))
    project_id: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    node: Mapped[str | None] = mapped_column(String(255))
    vm_state: Mapped[str | None] = mapped_column(String(36))
    task_state: Mapped[str | None] = mapped_column(String(36))
    power_state: Mapped[str | None] = mapped_column(String(36))
    # A copy of the flavor the instance was built with (see Flavor.to_embedded).
    flavor: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    vcpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    root_gb: Mapped[int] = mapped_column(Integer, default=0)
    ephemeral_gb: Mapped[int] = mapped_column(Integer, default=0)
    image_ref: Mapped[str | None] = mapped_column(String(255))
    launched_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    terminated_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    progress: Mapped[int | None] = mapped_column(Integer)
    launch_index: Mapped[int | None] = mapped_column(Integer)
    # Release 1.1: an operator lock (no delete, no live migration) and why.
    locked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    locked_reason: Mapped[str | None] = mapped_column(String(255))


class SecurityGroup(SoftDelete, Base):
    __tablename__ = "security_groups"
    __table_args__ = (Index(None, "project_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255))
    user_id: Mapped[str | None] = mapped_column(String(255))
    project_id: Mapped[str | None] = mapped_column(String(255))


class SecurityGroupInstanceAssociation(SoftDelete, Base):
    __tablename__ = "security_group_instance_association"
    __table_args__ = (Index(None, "instance_uuid"), Index(None, "security_group_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    security_group_id: Mapped[int] = mapped_column(ForeignKey("security_groups.id"))
    instance_uuid: Mapped[str] = mapped_column(String(36))


class SecurityGroupRule(SoftDelete, Base):
    __tablename__ = "security_group_rules"
    __table_args__ = (Index(None, "parent_group_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_group_id: Mapped[int] = mapped_column(ForeignKey("security_groups.id"))
    protocol: Mapped[str | None] = mapped_column(String(16))
    from_port: Mapped[int | None] = mapped_column(Integer)
    to_port: Mapped[int | None] = mapped_column(Integer)
    cidr: Mapped[str | None] = mapped_column(String(64))
    grantee_group_id: Mapped[int | None] = mapped_column(Integer)


class ComputeNode(SoftDelete, Base):
    __tablename__ = "compute_nodes"
    __table_args__ = (Index(None, "host", "hypervisor_hostname"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    hypervisor_hostname: Mapped[str] = mapped_column(String(255))
    hypervisor_type: Mapped[str] = mapped_column(String(255))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    local_gb: Mapped[int] = mapped_column(Integer)
    vcpus_used: Mapped[int] = mapped_column(Integer)
    memory_mb_used: Mapped[int] = mapped_column(Integer)
    local_gb_used: Mapped[int] = mapped_column(Integer)
    running_vms: Mapped[int] = mapped_column(Integer)
    cpu_allocation_ratio: Mapped[float] = mapped_column(Float)
    ram_allocation_ratio: Mapped[float] = mapped_column(Float)
    disk_allocation_ratio: Mapped[float] = mapped_column(Float)


class Service(SoftDelete, Base):
    __tablename__ = "services"
    __table_args__ = (Index(None, "host", "binary"), Index(None, "binary"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    binary: Mapped[str] = mapped_column(String(255))
    topic: Mapped[str | None] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer, default=0)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    last_seen_up: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    forced_down: Mapped[bool] = mapped_column(Boolean, default=False)
    report_count: Mapped[int] = mapped_column(Integer, default=0)


class Migration(SoftDelete, Base):
    __tablename__ = "migrations"
    __table_args__ = (
        Index(None, "instance_uuid"),
        Index(None, "source_compute", "status"),
        Index(None, "dest_compute", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    instance_uuid: Mapped[str] = mapped_column(String(36))
    source_compute: Mapped[str | None] = mapped_column(String(255))
    dest_compute: Mapped[str | None] = mapped_column(String(255))
    source_node: Mapped[str | None] = mapped_column(String(255))
    dest_node: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(36))
    migration_type: Mapped[str] = mapped_column(String(36))
    # Bytes: 64-bit (a guest's memory easily exceeds 2 GiB).
    memory_total: Mapped[int | None] = mapped_column(BigInteger)
    memory_processed: Mapped[int | None] = mapped_column(BigInteger)
    memory_remaining: Mapped[int | None] = mapped_column(BigInteger)
    # Release 1.1: disk copy progress of migrations without shared storage, in bytes.
    disk_total: Mapped[int | None] = mapped_column(BigInteger)
    disk_processed: Mapped[int | None] = mapped_column(BigInteger)
    disk_remaining: Mapped[int | None] = mapped_column(BigInteger)


class BlockDeviceMapping(SoftDelete, Base):
    __tablename__ = "block_device_mappings"
    __table_args__ = (Index(None, "instance_uuid"), Index(None, "volume_id", "instance_uuid"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    instance_uuid: Mapped[str] = mapped_column(String(36))
    source_type: Mapped[str | None] = mapped_column(String(36))
    destination_type: Mapped[str | None] = mapped_column(String(36))
    device_name: Mapped[str | None] = mapped_column(String(255))
    boot_index: Mapped[int | None] = mapped_column(Integer)
    delete_on_termination: Mapped[bool] = mapped_column(Boolean, default=False)
    volume_id: Mapped[str | None] = mapped_column(String(36))
    volume_size: Mapped[int | None] = mapped_column(Integer)
    image_id: Mapped[str | None] = mapped_column(String(36))
    snapshot_id: Mapped[str | None] = mapped_column(String(36))
    disk_bus: Mapped[str | None] = mapped_column(String(255))
    device_type: Mapped[str | None] = mapped_column(String(255))
    guest_format: Mapped[str | None] = mapped_column(String(255))
    connection_info: Mapped[str | None] = mapped_column(Text)
    attachment_id: Mapped[str | None] = mapped_column(String(36))
    tag: Mapped[str | None] = mapped_column(String(255))


class InstanceAction(SoftDelete, Base):
    __tablename__ = "instance_actions"
    __table_args__ = (Index(None, "instance_uuid", "request_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(255))
    instance_uuid: Mapped[str] = mapped_column(String(36))
    request_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str | None] = mapped_column(String(255))
    project_id: Mapped[str | None] = mapped_column(String(255))
    start_time: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    finish_time: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    message: Mapped[str | None] = mapped_column(String(255))


class InstanceActionEvent(SoftDelete, Base):
    __tablename__ = "instance_action_events"
    __table_args__ = (Index(None, "action_id", "event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("instance_actions.id"))
    event: Mapped[str] = mapped_column(String(255))
    start_time: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    finish_time: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[str | None] = mapped_column(String(255))
    traceback: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[str | None] = mapped_column(Text)


class InstanceFault(SoftDelete, Base):
    __tablename__ = "instance_faults"
    __table_args__ = (Index(None, "instance_uuid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_uuid: Mapped[str] = mapped_column(String(36))
    code: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))


metadata = Base.metadata


# Indexes on expressions, declared on the tables once the columns exist (migration 0004).
_T = metadata.tables
# The host view's delta reads (``conductor.host_view``): the rows changed since its last read.
Index("ix_compute_nodes_changed_at", changed_at(_T["compute_nodes"]))
Index("ix_services_changed_at", changed_at(_T["services"]))
# The reconciler's scan of instances with a task (``conductor.reconcile.statements``): few of
# the fleet's instances have one, so the partial index stays small, and it is ordered by age.
Index(
    "ix_instances_busy_changed",
    last_stamp(_T["instances"]),
    postgresql_where=_T["instances"].c.task_state.is_not(None),
    sqlite_where=_T["instances"].c.task_state.is_not(None),
)
# The reconciler's scan of unfinished actions: almost every action is finished.
Index(
    "ix_instance_actions_open",
    _T["instance_actions"].c.id,
    postgresql_where=_T["instance_actions"].c.finish_time.is_(None),
    sqlite_where=_T["instance_actions"].c.finish_time.is_(None),
)
