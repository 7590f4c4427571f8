"""The reconciler's SQL: the batched reads of one pass and its batched compare-and-swaps.

Each function runs one statement through ``DbApi.run_statement`` (compiled once per shape). A
read returns at most ``limit`` rows whatever the fleet's size; a write names its candidates
(``uuid = ANY(:uuids)``) *and* repeats the rule's condition, so a row that changed since the read
(its agent came back, another conductor acted first) is left alone: two conductors running the
same pass at once each change a row at most once between them. On PostgreSQL the second
``UPDATE`` waits for the first one's row lock and re-checks its ``WHERE`` on the new row version.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    String,
    and_,
    any_,
    bindparam,
    case,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)

from conductor.db import models
from conductor.tasks.build_extras import RUN_EVENT
from conductor.tasks.build_recovery import RECAST_EVENT
from shared_objects.fields import TaskState, VMState
from shared_objects.releases import BINARY_COMPUTE

Row = dict[str, Any]

_T = models.metadata.tables
INSTANCES = _T["instances"]
SERVICES = _T["services"]
MIGRATIONS = _T["migrations"]
ACTIONS = _T["instance_actions"]
EVENTS = _T["instance_action_events"]
FAULTS = _T["instance_faults"]
BDMS = _T["block_device_mappings"]

#: The task states a pass looks at on instances.
WATCHED_TASK_STATES = (
    TaskState.SCHEDULING,
    TaskState.BLOCK_DEVICE_MAPPING,
    TaskState.SPAWNING,
    TaskState.DELETING,
)


def _member(col: Any, name: str, arrays: bool, type_: Any = None) -> ColumnElement[bool]:
    """``col`` is in the list bound as ``name`` (``= ANY`` on PostgreSQL: one statement text
    whatever the list's length)."""
    kind = type_ if type_ is not None else col.type
    if arrays:
        return col == any_(bindparam(name, type_=ARRAY(kind)))
    return col.in_(bindparam(name, expanding=True, type_=kind))


def _stamp(table: Any) -> Any:
    """When the row last changed (``updated_at``, else when it was created)."""
    return func.coalesce(table.c.updated_at, table.c.created_at)


def _host_up(host_col: Any) -> ColumnElement[bool]:
    """A compute service on ``host_col`` reported since ``:up_since`` and is not forced down: the
    same test as ``Service.is_up_at`` (a service marked down has no ``last_seen_up``)."""
    s = SERVICES
    return exists(
        select(s.c.id).where(
            s.c.host == host_col,
            s.c.binary == literal(BINARY_COMPUTE),
            s.c.deleted == false(),
            s.c.forced_down == false(),
            s.c.last_seen_up >= bindparam("up_since", type_=s.c.last_seen_up.type),
        )
    )


async def _run(
    db: Any,
    name: str,
    table: str,
    build: Any,
    params: dict[str, Any],
    *,
    rows: bool,
    write: bool = False,
) -> Any:
    return await db.run_statement((name,), table, build, params, rows=rows, write=write)


# --- reads ------------------------------------------------------------------------------------


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


def _settled_instance(i: Any) -> ColumnElement[bool]:
    """Nothing is going on with the instance: no task, not building (or it is deleted)."""
    return or_(
        i.c.deleted == true(),
        and_(i.c.task_state.is_(None), i.c.vm_state != literal(VMState.BUILDING)),
    )


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


# --- compare-and-swaps ------------------------------------------------------------------------


async def fail_builds_on_down_hosts(
    db: Any,
    uuids: Sequence[str],
    *,
    states: Sequence[str],
    older_than: datetime.datetime,
    up_since: datetime.datetime,
    now: datetime.datetime,
) -> list[Row]:
    """ERROR, task cleared, for the candidates still in ``states``, unchanged since
    ``older_than`` and on a host that is still down; returns those changed (uuid, host). The
    host stays: the guest may exist there, and a later delete goes to it."""
    i = INSTANCES

    def build(arrays: bool) -> Any:
        return (
            update(i)
            .where(
                _member(i.c.uuid, "uuids", arrays),
                i.c.deleted == false(),
                _member(i.c.task_state, "states", arrays),
                _stamp(i) < bindparam("older_than", type_=i.c.updated_at.type),
                i.c.host.is_not(None),
                not_(_host_up(i.c.host)),
            )
            .values(
                vm_state=literal(VMState.ERROR),
                task_state=None,
                updated_at=bindparam("now", type_=i.c.updated_at.type),
            )
            .returning(i.c.uuid, i.c.host)
        )

    params = {
        "uuids": list(uuids),
        "states": list(states),
        "older_than": older_than,
        "up_since": up_since,
        "now": now,
    }
    found: list[Row] = await _run(
        db, "reconcile_fail_builds", "instances", build, params, rows=True, write=True
    )
    return found


async def finish_deletes_on_down_hosts(
    db: Any,
    uuids: Sequence[str],
    *,
    older_than: datetime.datetime,
    up_since: datetime.datetime,
    now: datetime.datetime,
) -> list[Row]:
    """Deleted in the database (``deleted``, vm_state ``deleted``) for the candidates still
    ``deleting``, unchanged since ``older_than``, on a host that is still down; returns those
    changed (uuid, host). ``host`` is kept, so the returning agent can tell whose guest it had."""
    i = INSTANCES

    def build(arrays: bool) -> Any:
        return (
            update(i)
            .where(
                _member(i.c.uuid, "uuids", arrays),
                i.c.deleted == false(),
                i.c.task_state == literal(TaskState.DELETING),
                _stamp(i) < bindparam("older_than", type_=i.c.updated_at.type),
                i.c.host.is_not(None),
                not_(_host_up(i.c.host)),
            )
            .values(
                vm_state=literal(VMState.DELETED),
                task_state=None,
                deleted=True,
                deleted_at=bindparam("now", type_=i.c.updated_at.type),
                terminated_at=bindparam("now", type_=i.c.updated_at.type),
                updated_at=bindparam("now", type_=i.c.updated_at.type),
            )
            .returning(i.c.uuid, i.c.host)
        )

    params = {"uuids": list(uuids), "older_than": older_than, "up_since": up_since, "now": now}
    found: list[Row] = await _run(
        db, "reconcile_finish_deletes", "instances", build, params, rows=True, write=True
    )
    return found


async def delete_bdms(db: Any, uuids: Sequence[str], now: datetime.datetime) -> int:
    """Soft-delete the block device mappings of deleted instances (what terminate does)."""
    b = BDMS

    def build(arrays: bool) -> Any:
        return (
            update(b)
            .where(_member(b.c.instance_uuid, "uuids", arrays), b.c.deleted == false())
            .values(
                deleted=True,
                deleted_at=bindparam("now", type_=b.c.updated_at.type),
                updated_at=bindparam("now", type_=b.c.updated_at.type),
            )
        )

    count: int = await _run(
        db,
        "reconcile_delete_bdms",
        "block_device_mappings",
        build,
        {"uuids": list(uuids), "now": now},
        rows=False,
        write=True,
    )
    return count


async def record_faults(
    db: Any,
    uuids: Sequence[str],
    *,
    code: int,
    prefix: str,
    suffix: str,
    details: str,
    now: datetime.datetime,
) -> int:
    """One InstanceFault per instance: ``prefix + <its host> + suffix`` (one statement)."""
    f, i = FAULTS, INSTANCES

    def build(arrays: bool) -> Any:
        message = func.substr(
            bindparam("prefix", type_=String())
            + func.coalesce(i.c.host, literal("?"))
            + bindparam("suffix", type_=String()),
            1,
            255,
        )
        rows = select(
            i.c.uuid,
            bindparam("code", type_=f.c.code.type),
            message,
            bindparam("details", type_=f.c.details.type),
            i.c.host,
            bindparam("now", type_=f.c.created_at.type),
            false(),
        ).where(_member(i.c.uuid, "uuids", arrays))
        columns = ["instance_uuid", "code", "message", "details", "host", "created_at", "deleted"]
        return insert(f).from_select([f.c[c] for c in columns], rows)

    params = {
        "uuids": list(uuids),
        "code": code,
        "prefix": prefix,
        "suffix": suffix,
        "details": details,
        "now": now,
    }
    count: int = await _run(
        db, "reconcile_faults", "instance_faults", build, params, rows=False, write=True
    )
    return count


async def finish_actions_of(
    db: Any, uuids: Sequence[str], *, message: str | None, now: datetime.datetime
) -> list[Row]:
    """Finish every open action of these instances (message ``Error`` for a failure, None for
    a success, as the agents do); returns the finished actions' ids."""
    a = ACTIONS

    def build(arrays: bool) -> Any:
        return (
            update(a)
            .where(_member(a.c.instance_uuid, "uuids", arrays), a.c.finish_time.is_(None))
            .values(
                finish_time=bindparam("now", type_=a.c.finish_time.type),
                updated_at=bindparam("now", type_=a.c.finish_time.type),
                message=bindparam("message", type_=a.c.message.type),
            )
            .returning(a.c.id)
        )

    params = {"uuids": list(uuids), "message": message, "now": now}
    found: list[Row] = await _run(
        db, "reconcile_finish_actions_of", "instance_actions", build, params, rows=True, write=True
    )
    return found


async def finish_actions(
    db: Any, ids: Sequence[int], *, message: str | None, now: datetime.datetime
) -> list[Row]:
    """Finish these actions if still open (and their instance still settled); returns the ids
    finished."""
    a, i = ACTIONS, INSTANCES

    def build(arrays: bool) -> Any:
        still_settled = exists(
            select(i.c.id).where(i.c.uuid == a.c.instance_uuid, _settled_instance(i))
        )
        return (
            update(a)
            .where(_member(a.c.id, "ids", arrays), a.c.finish_time.is_(None), still_settled)
            .values(
                finish_time=bindparam("now", type_=a.c.finish_time.type),
                updated_at=bindparam("now", type_=a.c.finish_time.type),
                message=bindparam("message", type_=a.c.message.type),
            )
            .returning(a.c.id)
        )

    params = {"ids": list(ids), "message": message, "now": now}
    found: list[Row] = await _run(
        db, "reconcile_finish_actions", "instance_actions", build, params, rows=True, write=True
    )
    return found


async def close_events(
    db: Any, action_ids: Sequence[int], *, details: str, now: datetime.datetime
) -> int:
    """Close the still-open events of these actions as ``Error`` (the work they recorded was
    abandoned: its host went down, or its message was lost)."""
    e = EVENTS

    def build(arrays: bool) -> Any:
        return (
            update(e)
            .where(_member(e.c.action_id, "ids", arrays), e.c.finish_time.is_(None))
            .values(
                finish_time=bindparam("now", type_=e.c.finish_time.type),
                updated_at=bindparam("now", type_=e.c.finish_time.type),
                result=literal("Error"),
                details=bindparam("details", type_=e.c.details.type),
            )
        )

    count: int = await _run(
        db,
        "reconcile_close_events",
        "instance_action_events",
        build,
        {"ids": list(action_ids), "details": details, "now": now},
        rows=False,
        write=True,
    )
    return count


async def settle_migrations(
    db: Any,
    uuids: Sequence[str],
    *,
    statuses: Sequence[str],
    new_status: str,
    older_than: datetime.datetime,
    up_since: datetime.datetime,
    now: datetime.datetime,
) -> list[Row]:
    """``new_status`` for the candidate migrations still in ``statuses``, unchanged since
    ``older_than``, whose source and destination are both still down; returns those changed."""
    m = MIGRATIONS

    def build(arrays: bool) -> Any:
        return (
            update(m)
            .where(
                _member(m.c.uuid, "uuids", arrays),
                _member(m.c.status, "statuses", arrays),
                _stamp(m) < bindparam("older_than", type_=m.c.updated_at.type),
                not_(_host_up(m.c.source_compute)),
                or_(m.c.dest_compute.is_(None), not_(_host_up(m.c.dest_compute))),
            )
            .values(
                status=bindparam("new_status", type_=m.c.status.type),
                updated_at=bindparam("now", type_=m.c.updated_at.type),
            )
            .returning(m.c.uuid, m.c.instance_uuid, m.c.source_compute, m.c.dest_compute)
        )

    params = {
        "uuids": list(uuids),
        "statuses": list(statuses),
        "new_status": new_status,
        "older_than": older_than,
        "up_since": up_since,
        "now": now,
    }
    found: list[Row] = await _run(
        db,
        f"reconcile_settle_migrations_{new_status}",
        "migrations",
        build,
        params,
        rows=True,
        write=True,
    )
    return found


async def release_migrated_instances(
    db: Any, uuids: Sequence[str], *, vm_state: str | None, now: datetime.datetime
) -> list[Row]:
    """Clear ``migrating`` on these instances (and set ``vm_state`` when given); returns those
    changed."""
    i = INSTANCES
    values: dict[str, Any] = {
        "task_state": None,
        "progress": 0,
        "updated_at": bindparam("now", type_=i.c.updated_at.type),
    }
    if vm_state is not None:
        values["vm_state"] = bindparam("vm_state", type_=i.c.vm_state.type)

    def build(arrays: bool) -> Any:
        return (
            update(i)
            .where(
                _member(i.c.uuid, "uuids", arrays),
                i.c.task_state == literal(TaskState.MIGRATING),
            )
            .values(values)
            .returning(i.c.uuid, i.c.host)
        )

    params: dict[str, Any] = {"uuids": list(uuids), "now": now}
    if vm_state is not None:
        params["vm_state"] = vm_state
    found: list[Row] = await _run(
        db,
        f"reconcile_release_instances_{vm_state}",
        "instances",
        build,
        params,
        rows=True,
        write=True,
    )
    return found
