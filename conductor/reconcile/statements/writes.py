"""The reconciler's batched compare-and-swaps: each names its candidates and repeats its rule's
condition, so a row that changed since the read is left alone.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    String,
    bindparam,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    update,
)

from conductor.reconcile.statements.tables import (
    ACTIONS,
    BDMS,
    EVENTS,
    FAULTS,
    INSTANCES,
    MIGRATIONS,
    Row,
    _host_up,
    _member,
    _run,
    _settled_instance,
    _stamp,
)
from shared_objects.fields import TaskState, VMState


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
