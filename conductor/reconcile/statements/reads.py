"""The batched reads of one reconciler pass: each returns at most ``limit`` rows whatever the
fleet's size.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, case, exists, false, literal, select

from conductor.reconcile.statements.tables import (
    ACTIONS,
    EVENTS,
    INSTANCES,
    MIGRATIONS,
    SERVICES,
    WATCHED_TASK_STATES,
    Row,
    _member,
    _run,
    _settled_instance,
    _stamp,
)
from conductor.tasks.build_extras import RUN_EVENT
from conductor.tasks.build_recovery import RECAST_EVENT
from shared_objects.fields import TaskState
from shared_objects.releases import BINARY_COMPUTE


async def compute_services(db: Any) -> list[Row]:
    """Every compute service's liveness columns (one row per host)."""
    s = SERVICES

    def build(_arrays: bool) -> Any:
        return select(s.c.host, s.c.last_seen_up, s.c.forced_down).where(
            s.c.binary == literal(BINARY_COMPUTE), s.c.deleted == false()
        )

    found: list[Row] = await _run(db, "reconcile_services", "services", build, {}, rows=True)
    return found


async def transitional_instances(
    db: Any, *, older_than: datetime.datetime, limit: int
) -> list[Row]:
    """Instances in a watched task state unchanged since ``older_than``, oldest first, with the
    request id of their latest ``create`` action and whether the reconciler already re-cast the
    build since the instance last changed."""
    i, a, e = INSTANCES, ACTIONS, EVENTS
    # The action the work belongs to: the delete's for a delete, the create's otherwise.
    wanted_action = case((i.c.task_state == literal(TaskState.DELETING), "delete"), else_="create")
    latest_create = (
        select(a.c.request_id)
        .where(a.c.instance_uuid == i.c.uuid, a.c.action == wanted_action)
        .order_by(a.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    recast = exists(
        select(e.c.id)
        .select_from(e.join(a, a.c.id == e.c.action_id))
        .where(
            a.c.instance_uuid == i.c.uuid,
            e.c.event == literal(RECAST_EVENT),
            e.c.start_time >= _stamp(i),
        )
    )

    def build(arrays: bool) -> Any:
        return (
            select(
                i.c.uuid,
                i.c.host,
                i.c.vm_state,
                i.c.task_state,
                i.c.user_id,
                i.c.project_id,
                i.c.updated_at,
                _stamp(i).label("changed_at"),
                latest_create.label("create_request_id"),
                recast.label("recast"),
            )
            .where(
                i.c.deleted == false(),
                _member(i.c.task_state, "states", arrays),
                _stamp(i) < bindparam("older_than", type_=i.c.updated_at.type),
            )
            .order_by(_stamp(i))
            .limit(bindparam("limit", type_=i.c.id.type))
        )

    params = {"states": list(WATCHED_TASK_STATES), "older_than": older_than, "limit": limit}
    found: list[Row] = await _run(db, "reconcile_instances", "instances", build, params, rows=True)
    return found


async def stale_migrations(
    db: Any, *, statuses: Sequence[str], older_than: datetime.datetime, limit: int
) -> list[Row]:
    """Migrations in one of ``statuses`` unchanged since ``older_than``, with their instance's
    state."""
    m, i = MIGRATIONS, INSTANCES

    def build(arrays: bool) -> Any:
        return (
            select(
                m.c.uuid,
                m.c.instance_uuid,
                m.c.source_compute,
                m.c.dest_compute,
                m.c.status,
                i.c.host.label("instance_host"),
                i.c.vm_state,
                i.c.task_state,
            )
            .select_from(m.join(i, i.c.uuid == m.c.instance_uuid))
            .where(
                m.c.deleted == false(),
                _member(m.c.status, "statuses", arrays),
                _stamp(m) < bindparam("older_than", type_=m.c.updated_at.type),
            )
            .order_by(_stamp(m))
            .limit(bindparam("limit", type_=m.c.id.type))
        )

    params = {"statuses": list(statuses), "older_than": older_than, "limit": limit}
    found: list[Row] = await _run(
        db, "reconcile_migrations", "migrations", build, params, rows=True
    )
    return found


async def open_actions(db: Any, *, older_than: datetime.datetime, limit: int) -> list[Row]:
    """Actions without a finish, started before ``older_than``, on settled instances; with the
    instance's vm_state and the result of the action's latest finished event."""
    a, i, e = ACTIONS, INSTANCES, EVENTS
    last_result = (
        select(e.c.result)
        .where(e.c.action_id == a.c.id, e.c.finish_time.is_not(None))
        .order_by(e.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )

    def build(_arrays: bool) -> Any:
        return (
            select(
                a.c.id,
                a.c.instance_uuid,
                a.c.action,
                i.c.vm_state,
                last_result.label("last_result"),
            )
            .select_from(a.join(i, i.c.uuid == a.c.instance_uuid))
            .where(
                a.c.finish_time.is_(None),
                a.c.deleted == false(),
                a.c.start_time < bindparam("older_than", type_=a.c.start_time.type),
                _settled_instance(i),
            )
            .order_by(a.c.id)
            .limit(bindparam("limit", type_=a.c.id.type))
        )

    params = {"older_than": older_than, "limit": limit}
    found: list[Row] = await _run(
        db, "reconcile_actions", "instance_actions", build, params, rows=True
    )
    return found


async def build_attempts(db: Any, uuids: Sequence[str]) -> list[Row]:
    """The hosts of the build attempts recorded under each instance's ``create`` action."""
    a, e = ACTIONS, EVENTS

    def build(arrays: bool) -> Any:
        return (
            select(a.c.instance_uuid, e.c.host)
            .select_from(e.join(a, a.c.id == e.c.action_id))
            .where(
                _member(a.c.instance_uuid, "uuids", arrays),
                a.c.action == literal("create"),
                e.c.event == literal(RUN_EVENT),
            )
        )

    found: list[Row] = await _run(
        db,
        "reconcile_attempts",
        "instance_action_events",
        build,
        {"uuids": list(uuids)},
        rows=True,
    )
    return found
