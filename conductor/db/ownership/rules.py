"""The rule table: for each table, which rows an agent may read, update and insert, and which
columns and values it may write (the table in ``conductor/db/ownership/__init__.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sqlalchemy import BindParameter, and_, bindparam, or_

from conductor.db.ownership.conditions import (
    _linked_group,
    _of_action,
    _of_instance,
    instance_on_my_host,
    instance_readable,
    instance_writable,
)
from conductor.db.ownership.scope import _TABLES, AGENT_BINARY, Condition


def _guard_param(name: str, table: str, column: str) -> BindParameter[Any]:
    return bindparam(name, type_=_TABLES[table].c[column].type)


@dataclasses.dataclass(frozen=True, slots=True)
class InsertRule:
    """Inserts allowed when ``guard`` holds (in the same statement; ``None``: values only).
    ``key``: the column whose value the guard checks (bound as ``g_<key>``)."""

    guard: Condition | None = None
    key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """What an agent may do with one table (the module docstring has the table)."""

    read: Condition | None = None  # None: nothing (unless read_all)
    read_all: bool = False
    update: Condition | None = None  # None: no update
    writable: frozenset[str] = frozenset()
    insert: InsertRule | None = None  # None: no insert


def _cols(*names: str) -> frozenset[str]:
    return frozenset(names)


_INSTANCE_UUID_GUARD = "g_instance_uuid"

RULES: Mapping[str, Rule] = {
    "instances": Rule(
        read=instance_readable,
        update=instance_writable,
        writable=_cols(
            "host",
            "node",
            "vm_state",
            "task_state",
            "power_state",
            "progress",
            "launched_at",
            "terminated_at",
            "updated_at",
            "deleted",
            "deleted_at",
        ),
    ),
    "compute_nodes": Rule(
        read=lambda t, q: q.mine(t.c.host),
        update=lambda t, q: q.mine(t.c.host),
        writable=_cols(
            "hypervisor_type",
            "vcpus",
            "memory_mb",
            "local_gb",
            "vcpus_used",
            "memory_mb_used",
            "local_gb_used",
            "running_vms",
            "cpu_allocation_ratio",
            "ram_allocation_ratio",
            "disk_allocation_ratio",
            "updated_at",
        ),
        insert=InsertRule(),
    ),
    "services": Rule(
        read_all=True,
        update=lambda t, q: and_(q.mine(t.c.host), q.is_(t.c.binary, "o_binary", AGENT_BINARY)),
        writable=_cols("topic", "version", "last_seen_up", "report_count", "updated_at"),
        insert=InsertRule(),
    ),
    "migrations": Rule(
        read=lambda t, q: or_(q.mine(t.c.source_compute), q.mine(t.c.dest_compute)),
        update=lambda t, q: or_(q.mine(t.c.source_compute), q.mine(t.c.dest_compute)),
        writable=_cols(
            "status",
            "memory_total",
            "memory_processed",
            "memory_remaining",
            "disk_total",
            "disk_processed",
            "disk_remaining",
            "updated_at",
        ),
    ),
    "block_device_mappings": Rule(
        read=_of_instance("instance_uuid", instance_readable),
        update=_of_instance("instance_uuid", instance_writable),
        writable=_cols(
            "device_name",
            "connection_info",
            "attachment_id",
            "disk_bus",
            "device_type",
            "guest_format",
            "updated_at",
            "deleted",
            "deleted_at",
        ),
        insert=InsertRule(
            _of_instance(
                _guard_param(_INSTANCE_UUID_GUARD, "block_device_mappings", "instance_uuid"),
                instance_writable,
            ),
            "instance_uuid",
        ),
    ),
    "instance_actions": Rule(
        read=_of_instance("instance_uuid", instance_readable),
        update=_of_instance("instance_uuid", instance_readable),
        writable=_cols("finish_time", "message", "updated_at"),
        insert=InsertRule(
            _of_instance(
                _guard_param(_INSTANCE_UUID_GUARD, "instance_actions", "instance_uuid"),
                instance_readable,
            ),
            "instance_uuid",
        ),
    ),
    "instance_action_events": Rule(
        read=_of_action("action_id"),
        update=_of_action("action_id"),
        writable=_cols("finish_time", "result", "traceback", "details", "updated_at"),
        insert=InsertRule(
            _of_action(_guard_param("g_action_id", "instance_action_events", "action_id")),
            "action_id",
        ),
    ),
    "instance_faults": Rule(
        read=_of_instance("instance_uuid", instance_readable),
        insert=InsertRule(
            _of_instance(
                _guard_param(_INSTANCE_UUID_GUARD, "instance_faults", "instance_uuid"),
                instance_readable,
            ),
            "instance_uuid",
        ),
    ),
    "security_group_instance_association": Rule(
        read=_of_instance("instance_uuid", instance_readable),
        update=_of_instance("instance_uuid", instance_on_my_host),
        writable=_cols("deleted", "deleted_at", "updated_at"),
    ),
    "security_groups": Rule(read=_linked_group("id")),
    "security_group_rules": Rule(read=_linked_group("parent_group_id")),
    "flavors": Rule(read_all=True),
}

_NO_RULE = Rule()


def rule_for(table: str) -> Rule:
    return RULES.get(table, _NO_RULE)
