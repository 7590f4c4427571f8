"""The ownership conditions of instances and of the rows that hang off them (actions, security
group links): an instance is readable on the caller's host or through its latest migration,
writable there while the migration is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import ColumnElement, FromClause, String, and_, bindparam, exists, false, or_

from conductor.db.ownership.scope import (
    _ACTIONS,
    _INSTANCES,
    _MIGRATIONS,
    _SG_LINKS,
    ACTIVE_MIGRATION_STATUSES,
    MOVABLE_MIGRATION_STATUSES,
    Condition,
    Sql,
)
from shared_objects.fields import TaskState


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
