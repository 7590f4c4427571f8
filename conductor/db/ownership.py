"""Ownership: which rows an agent's object calls may read and write (issue 11).

An agent speaks for the hosts its broker login names (``shared_objects.identity.Caller``).
The conductor runs each of its remotable calls in a unit of work that carries an
:class:`OwnerScope`; ``DbApi`` then adds this module's conditions to *every* statement of the
call, so the check rides inside the statement that reads or writes (extra ``WHERE`` terms,
``INSERT ... SELECT ... WHERE EXISTS``): there is no separate "may I?" query, nothing can change
between a check and the act, and the success path costs no extra statement. When a scoped
statement finds or changes nothing although the same statement without the scope would have,
``DbApi`` raises ``Forbidden`` (that second look happens only on the failure path). A write of
a column the table's rule does not list, or of a value the rule refuses, is ``Forbidden``
before any statement runs.

The rules. H is the caller's hosts. An instance is *readable* when its ``host`` is in H or
the caller is a host (source or destination) of the instance's latest migration, whatever that
migration's status (crash recovery and the action's finish come after it ended); it is
*writable* when its ``host`` is in H, or the caller is a host of its latest migration while
that migration is *in flight* (active, or the instance is still ``migrating``: not settled).

==================================== ==================== ==================== ==================
table                                read                 update               insert
==================================== ==================== ==================== ==================
instances                            readable             writable             never
compute_nodes                        host in H            host in H            host in H
services                             every row            host in H, compute   host in H, compute
migrations                           src or dest in H     src or dest in H     never
block_device_mappings                of a readable        of a writable        of a writable
instance_actions                     of a readable        of a readable        of a readable
instance_action_events               of such an action    of such an action    of such an action
instance_faults                      of a readable        never                of a readable
security_group_instance_association  of a readable        of one on H          never
security_groups                      linked to readable   never                never
security_group_rules                 of such a group      never                never
flavors                              every row            never                never
(any other table)                    never                never                never
==================================== ==================== ==================== ==================

"Of a readable"/"of a writable": rows whose ``instance_uuid`` is a readable/writable instance;
"of one on H": of an instance whose ``host`` is in H; "such an action": an ``instance_actions``
row of a readable instance; "compute": ``binary`` = ``fleet-compute`` (an agent cannot pose as a
conductor). Guarded inserts are ``INSERT ... SELECT ... WHERE EXISTS (...)``: the guard and the
insert are one statement.

Deletes (hard ``DELETE``) are never allowed: no agent flow deletes rows, soft deletes are
updates. The columns an update may set are listed per table (``Rule.writable`` in ``RULES``);
everything else is refused, in particular ``instances.user_id``, ``project_id``, ``locked``,
``locked_reason``, ``uuid``, ``flavor`` and the resource sizes, every foreign key or owner
column (``host`` of compute nodes and services, ``source_compute``/``dest_compute``,
``instance_uuid``, ``action_id``) and every service flag an operator sets (``disabled``,
``forced_down``).

Values a write may set:

* ``instances.host``: unchanged; or ``None`` on an instance whose ``host`` is in H (an agent
  hands a build back); or the destination of the instance's latest migration, while the
  instance is ``migrating`` and still on that migration's source, when the caller is its
  source or its destination and the migration is active or ``error`` (the switch-over, and its
  settlement by recovery after a crash or a silent peer). ``node`` follows no rule of its own:
  ownership goes by ``host``.
* ``deleted``: only ever set (never cleared); on ``instances`` only where ``host`` is in H (a
  migration peer may not destroy the instance).
* ``migrations.status``: an active status only on a migration that is still active (a finished
  migration cannot be reopened, which would make its hosts "in flight" again).
* ``host`` of inserted faults and action events: in H or ``None``.

Hosts travel as one bound parameter (``o_hosts``; ``= ANY(:array)`` on the driver path), so a
statement's text depends on the scope's *shape* only and compiles once for every agent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import (
    ARRAY,
    BindParameter,
    ColumnElement,
    FromClause,
    String,
    and_,
    any_,
    bindparam,
    exists,
    false,
    or_,
)

from conductor.db import models
from shared_objects import exception, releases
from shared_objects.fields import MigrationStatus, TaskState

#: Statuses of a migration still in progress (it holds resources on both hosts): the set
#: ``MigrationList.get_in_progress_by_host`` uses. Agents must not import ``conductor.db``; their
#: "is this migration still going on?" should use the same definition (``MigrationStatus.ALL``
#: minus ``MigrationStatus.FINISHED``).
ACTIVE_MIGRATION_STATUSES: tuple[str, ...] = tuple(
    s for s in MigrationStatus.ALL if s not in MigrationStatus.FINISHED
)

#: Statuses under which an instance may still switch hosts through its migration: active ones,
#: and ``error`` (the outcome is unknown; the recovery of either host settles it from the
#: hypervisors). ``completed``, ``failed`` and ``cancelled`` are settled.
MOVABLE_MIGRATION_STATUSES: tuple[str, ...] = (*ACTIVE_MIGRATION_STATUSES, MigrationStatus.ERROR)

#: The only binary whose ``services`` rows an agent may write.
AGENT_BINARY = releases.BINARY_COMPUTE

#: The bound parameter that carries the caller's hosts.
HOSTS_PARAM = "o_hosts"

_TABLES = models.metadata.tables
_INSTANCES = _TABLES["instances"]
_MIGRATIONS = _TABLES["migrations"]
_ACTIONS = _TABLES["instance_actions"]
_SG_LINKS = _TABLES["security_group_instance_association"]


@dataclasses.dataclass(frozen=True, slots=True)
class OwnerScope:
    """What a scoped unit of work may touch: the rows of ``hosts`` (see the module docstring).
    ``login`` is the broker login, named in ``Forbidden`` errors."""

    hosts: frozenset[str]
    login: str

    def params(self) -> dict[str, Any]:
        """The bound parameters every scoped statement takes."""
        return {HOSTS_PARAM: sorted(self.hosts)}


class Sql:
    """Condition building blocks for one statement form (``arrays`` as in
    ``conductor.db.where.where_clause_for``: ``= ANY(:array)`` instead of an expanding ``IN``)."""

    def __init__(self, arrays: bool) -> None:
        self.arrays = arrays

    def mine(self, col: Any) -> ColumnElement[bool]:
        """``col`` names one of the caller's hosts."""
        if self.arrays:
            return col == any_(bindparam(HOSTS_PARAM, type_=ARRAY(String())))
        return col.in_(bindparam(HOSTS_PARAM, expanding=True, type_=String()))

    def one_of(self, col: Any, name: str, values: Iterable[str]) -> ColumnElement[bool]:
        """``col`` is one of the constant ``values`` (a bound parameter with its value)."""
        listed = list(values)
        if self.arrays:
            return col == any_(bindparam(name, value=listed, type_=ARRAY(col.type)))
        return col.in_(bindparam(name, value=listed, expanding=True, type_=col.type))

    @staticmethod
    def is_(col: Any, name: str, value: Any) -> ColumnElement[bool]:
        """``col`` equals the constant ``value``."""
        return col == bindparam(name, value=value, type_=col.type)


# A condition on the rows of one table (the statement's own table, or an alias of it).
Condition = Callable[[FromClause, Sql], ColumnElement[bool]]


# --- instances --------------------------------------------------------------------------------


def _no_more(_m: FromClause) -> Iterable[ColumnElement[bool]]:
    return ()


def _latest_migration(
    i: FromClause, q: Sql, extra: Callable[[FromClause], Iterable[ColumnElement[bool]]] = _no_more
) -> ColumnElement[bool]:
    """The instance's latest migration names one of the caller's hosts as its source or its
    destination (and satisfies ``extra``)."""
    m = _MIGRATIONS.alias()
    newer = _MIGRATIONS.alias()
    return exists().where(
        m.c.instance_uuid == i.c.uuid,
        m.c.deleted == false(),
        or_(q.mine(m.c.source_compute), q.mine(m.c.dest_compute)),
        ~exists().where(
            newer.c.instance_uuid == m.c.instance_uuid,
            newer.c.deleted == false(),
            newer.c.id > m.c.id,
        ),
        *extra(m),
    )


def instance_on_my_host(i: FromClause, q: Sql) -> ColumnElement[bool]:
    return q.mine(i.c.host)


def instance_readable(i: FromClause, q: Sql) -> ColumnElement[bool]:
    """On one of the caller's hosts, or the caller is a host of its latest migration."""
    return or_(q.mine(i.c.host), _latest_migration(i, q))


def instance_writable(i: FromClause, q: Sql) -> ColumnElement[bool]:
    """On one of the caller's hosts, or the caller is a host of its latest migration while that
    migration is in flight (active, or the instance is still ``migrating``: not settled)."""
    in_flight: Callable[[FromClause], Iterable[ColumnElement[bool]]] = lambda m: (  # noqa: E731
        or_(
            q.one_of(m.c.status, "o_active", ACTIVE_MIGRATION_STATUSES),
            q.is_(i.c.task_state, "o_migrating", TaskState.MIGRATING),
        ),
    )
    return or_(q.mine(i.c.host), _latest_migration(i, q, in_flight))


def _host_move(i: FromClause, q: Sql) -> ColumnElement[bool]:
    """``host`` may become ``:g_host``: it already is, or ``:g_host`` is the destination of the
    instance's latest migration, which the caller takes part in and which is not settled
    (``MOVABLE_MIGRATION_STATUSES``), while the instance is migrating and still on that
    migration's source."""
    new_host = bindparam("g_host", type_=String())
    switch_over: Callable[[FromClause], Iterable[ColumnElement[bool]]] = lambda m: (  # noqa: E731
        m.c.source_compute == i.c.host,
        m.c.dest_compute == new_host,
        q.one_of(m.c.status, "o_movable", MOVABLE_MIGRATION_STATUSES),
    )
    return or_(
        i.c.host == new_host,
        and_(
            q.is_(i.c.task_state, "o_migrating", TaskState.MIGRATING),
            _latest_migration(i, q, switch_over),
        ),
    )


def _of_instance(uuid: Any, allowed: Condition) -> Condition:
    """Rows that belong to the instance ``uuid`` (a column, or a bound value) when that instance
    satisfies ``allowed``."""

    def condition(_t: FromClause, q: Sql) -> ColumnElement[bool]:
        i = _INSTANCES.alias()
        return exists().where(i.c.uuid == _resolve(uuid, _t), allowed(i, q))

    return condition


def _resolve(ref: Any, t: FromClause) -> Any:
    """A column named by a string is the statement table's column; anything else is as given."""
    return t.c[ref] if isinstance(ref, str) else ref


def _of_action(action_id: Any) -> Condition:
    """Rows under the action ``action_id`` (a column name, or a bound value) of a readable
    instance."""

    def condition(t: FromClause, q: Sql) -> ColumnElement[bool]:
        a = _ACTIONS.alias()
        return exists().where(
            a.c.id == _resolve(action_id, t),
            _of_instance(a.c.instance_uuid, instance_readable)(a, q),
        )

    return condition


def _linked_group(group_id: str) -> Condition:
    """Security groups (or their rules) linked to a readable instance."""

    def condition(t: FromClause, q: Sql) -> ColumnElement[bool]:
        link = _SG_LINKS.alias()
        return exists().where(
            link.c.security_group_id == t.c[group_id],
            _of_instance(link.c.instance_uuid, instance_readable)(link, q),
        )

    return condition


# --- the rule table ---------------------------------------------------------------------------


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


# --- what DbApi asks ---------------------------------------------------------------------------


def describe(where: Mapping[str, Any], limit: int = 160) -> str:
    """A short text of the values a statement was keyed by (for ``Forbidden.target``)."""
    text = ", ".join(f"{k}={v!r}" for k, v in where.items()) or "(every row)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def forbidden(scope: OwnerScope, op: str, table: str, target: str) -> exception.Forbidden:
    return exception.Forbidden(caller=scope.login, action=f"{op} {table}", target=target)


def read_condition(scope: OwnerScope, table: str, op: str = "read") -> Condition | None:
    """The rows of ``table`` the scope may read; None: every row. Raises ``Forbidden`` for a
    table agents may not read at all."""
    rule = rule_for(table)
    if rule.read_all:
        return None
    if rule.read is None:
        raise forbidden(scope, op, table, "(no rows of this table are readable)")
    return rule.read


@dataclasses.dataclass(frozen=True, slots=True)
class WritePlan:
    """The scope's part of one write: a condition, its share of the statement's cache key and
    its bound parameters (beyond the scope's own)."""

    condition: Condition | None
    key: tuple[Any, ...]
    params: dict[str, Any]


def plan_update(
    scope: OwnerScope, table: str, where: Mapping[str, Any], values: Mapping[str, Any]
) -> WritePlan:
    """The condition that makes an update of ``values`` the scope's own, or ``Forbidden`` for a
    column or value no agent may write (before any statement runs)."""
    rule = rule_for(table)
    if rule.update is None:
        raise forbidden(scope, "update", table, describe(where))
    bad = sorted(n for n in values if n not in rule.writable)
    if bad:
        raise forbidden(scope, "update", table, f"{describe(where)} (column(s) {bad})")
    if "deleted" in values and values["deleted"] is not True:
        raise forbidden(scope, "update", table, f"{describe(where)} (undelete)")
    row_rule = rule.update
    guards: list[Condition] = []
    key: list[str] = []
    params: dict[str, Any] = {}
    if table == "instances":
        if "host" in values:
            if values["host"] is None:
                guards.append(instance_on_my_host)
                key.append("host=None")
            else:
                guards.append(_host_move)
                key.append("host=")
                params["g_host"] = values["host"]
        if "deleted" in values:
            guards.append(instance_on_my_host)
            key.append("deleted")
    elif table == "migrations" and values.get("status") in ACTIVE_MIGRATION_STATUSES:
        guards.append(lambda t, q: q.one_of(t.c.status, "o_active", ACTIVE_MIGRATION_STATUSES))
        key.append("status=active")

    def condition(t: FromClause, q: Sql) -> ColumnElement[bool]:
        return and_(row_rule(t, q), *(g(t, q) for g in guards))

    return WritePlan(condition, tuple(key), params)


def plan_insert(scope: OwnerScope, table: str, values: Mapping[str, Any]) -> WritePlan:
    """The guard an insert of ``values`` runs under (``condition`` None: the values alone
    decide, and they passed), or ``Forbidden`` before any statement runs."""
    rule = rule_for(table)
    if rule.insert is None:
        raise forbidden(scope, "insert into", table, "(agents may not create these rows)")
    refused = _refused_values(scope, table, values)
    if refused:
        raise forbidden(scope, "insert into", table, refused)
    insert = rule.insert
    if insert.guard is None or insert.key is None:
        return WritePlan(None, (), {})
    return WritePlan(insert.guard, (insert.key,), {f"g_{insert.key}": values.get(insert.key)})


def _refused_values(scope: OwnerScope, table: str, values: Mapping[str, Any]) -> str | None:
    """Why the inserted values themselves are not the scope's to write (None: they are)."""
    host = values.get("host")
    if table in ("compute_nodes", "services") and host not in scope.hosts:
        return f"host={host!r}"
    if table == "services" and values.get("binary") != AGENT_BINARY:
        return f"host={host!r}, binary={values.get('binary')!r}"
    if table in ("instance_faults", "instance_action_events") and not (
        host is None or host in scope.hosts
    ):
        return f"host={host!r}"
    if values.get("deleted") is True:
        return "deleted=True"
    return None
