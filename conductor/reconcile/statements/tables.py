"""What the reconciler's statements share: the tables, the task states it watches, and the
pieces of SQL every rule repeats (a host that is up, a set membership, a row's stamp).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    and_,
    any_,
    bindparam,
    exists,
    false,
    func,
    literal,
    or_,
    select,
    true,
)

from conductor.db import models
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


def _settled_instance(i: Any) -> ColumnElement[bool]:
    """Nothing is going on with the instance: no task, not building (or it is deleted)."""
    return or_(
        i.c.deleted == true(),
        and_(i.c.task_state.is_(None), i.c.vm_state != literal(VMState.BUILDING)),
    )
