"""What ``DbApi`` asks of the ownership rules: the condition of a read, the plan of an update or
an insert (refused values first), and the ``Forbidden`` error that names what was refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, FromClause, and_

from conductor.db.ownership.conditions import _host_move, instance_on_my_host
from conductor.db.ownership.rules import rule_for
from conductor.db.ownership.scope import (
    ACTIVE_MIGRATION_STATUSES,
    AGENT_BINARY,
    Condition,
    OwnerScope,
    Sql,
)
from shared_objects import exception


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
