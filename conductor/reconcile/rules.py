"""What the reconciler does with what a pass read: pure decisions, no I/O.

``plan`` maps the rows of one pass (``Snapshot``) and the time to a ``Plan``: which instance,
migration or action goes to which rule. The rules, with the bound of each in ``Bounds``:

=========================== ===================================================================
rule                        when → what
=========================== ===================================================================
``build_host_down``         ``scheduling`` on a host that is down → placed on another host
                            (an attempt counted; ERROR with a fault when none is left)
``build_cast_lost``         ``scheduling`` on an up host, unchanged for ``build_recast_after``
                            → ``run_instance`` sent again to it, once
``build_not_taken``         the same, ``build_reschedule_after`` after that re-cast → placed
                            on another host
``build_unassigned``        ``scheduling`` with no host for ``unassigned_build_after`` → placed
``build_taken_host_down``   ``block_device_mapping`` on a down host for ``build_host_down_after``
                            → placed on another host (nothing was spawned yet)
``spawn_host_down``         ``spawning`` on a down host for ``build_host_down_after`` → ERROR
                            with a fault (the guest may exist there)
``delete_not_finished``     ``deleting`` on an up host, unchanged for ``delete_recast_after``
                            → ``terminate_instance`` sent to it again (the cast was lost, or
                            the agent gave up during an outage); again each time the bound passes
``delete_host_down``        ``deleting`` on a down host for ``delete_host_down_after`` → deleted
                            in the database
``migration_hosts_down``    live migration with source and destination down for
                            ``migration_hosts_down_after`` → ``failed``, instance released on
                            its source; from ``running`` on (switch-over may have begun):
                            ``error`` and the instance ERROR with a fault
``action_unfinished``       an action still open on a settled instance for
                            ``action_settle_after`` → finished
=========================== ===================================================================
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from shared_objects.fields import MigrationStatus, TaskState, VMState

BUILD_HOST_DOWN = "build_host_down"
BUILD_CAST_LOST = "build_cast_lost"
BUILD_NOT_TAKEN = "build_not_taken"
BUILD_UNASSIGNED = "build_unassigned"
BUILD_TAKEN_HOST_DOWN = "build_taken_host_down"
SPAWN_HOST_DOWN = "spawn_host_down"
DELETE_NOT_FINISHED = "delete_not_finished"
DELETE_HOST_DOWN = "delete_host_down"
MIGRATION_HOSTS_DOWN = "migration_hosts_down"
ACTION_UNFINISHED = "action_unfinished"

RULES = (
    BUILD_HOST_DOWN,
    BUILD_CAST_LOST,
    BUILD_NOT_TAKEN,
    BUILD_UNASSIGNED,
    BUILD_TAKEN_HOST_DOWN,
    SPAWN_HOST_DOWN,
    DELETE_NOT_FINISHED,
    DELETE_HOST_DOWN,
    MIGRATION_HOSTS_DOWN,
    ACTION_UNFINISHED,
)

#: Migration statuses before anything ran on the destination's side of the switch-over: the
#: guest is on the source, whatever the destination holds is an incoming copy.
MIGRATION_BEFORE_COPY = (
    MigrationStatus.ACCEPTED,
    MigrationStatus.QUEUED,
    MigrationStatus.PREPARING,
)
#: From ``running`` on the source may have switched over before it went down (it writes
#: ``post-migrating`` after the switch): where the guest runs is not known.
MIGRATION_MAYBE_SWITCHED = (MigrationStatus.RUNNING, MigrationStatus.POST_MIGRATING)
WATCHED_MIGRATION_STATUSES = (*MIGRATION_BEFORE_COPY, *MIGRATION_MAYBE_SWITCHED)


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """Seconds each rule waits (``[conductor]`` in the configuration), and when a host is down."""

    service_down_time: float = 60.0
    build_recast_after: float = 30.0
    build_reschedule_after: float = 120.0
    unassigned_build_after: float = 60.0
    build_host_down_after: float = 30.0
    delete_recast_after: float = 60.0
    delete_host_down_after: float = 300.0
    migration_hosts_down_after: float = 120.0
    action_settle_after: float = 120.0

    @property
    def youngest(self) -> float:
        """The shortest wait of the instance rules: younger rows need no look."""
        return min(
            self.build_recast_after,
            self.unassigned_build_after,
            self.build_host_down_after,
            self.delete_recast_after,
            self.delete_host_down_after,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The rows one pass read (``conductor.reconcile.statements``)."""

    now: datetime.datetime
    services: Sequence[Mapping[str, Any]]
    instances: Sequence[Mapping[str, Any]]
    migrations: Sequence[Mapping[str, Any]] = ()
    actions: Sequence[Mapping[str, Any]] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """One instance to act on alone (a placement or a cast cannot be batched): the row as
    read, which the compare-and-swap expects unchanged. ``request_id`` is that of the
    instance's latest ``create`` action (``delete`` for a delete)."""

    rule: str
    uuid: str
    task_state: str
    host: str | None
    updated_at: datetime.datetime | None
    request_id: str | None
    user_id: str | None = None
    project_id: str | None = None


@dataclasses.dataclass(slots=True)
class Plan:
    """What one pass will do."""

    moves: list[Move] = dataclasses.field(default_factory=list)
    #: Batched: instance uuids per rule (spawn_host_down, delete_host_down), with old states.
    batches: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    #: Migrations per target: uuid → (instance uuid, old status).
    migrations_failed: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    migrations_lost: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    #: Actions to finish as errors, and as successes: id → (instance uuid, action name).
    actions_error: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)
    actions_ok: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)
    #: Why host-down rules on taken work were held back this pass (None: they were not).
    held: str | None = None

    @property
    def empty(self) -> bool:
        return not (
            self.moves
            or any(self.batches.values())
            or self.migrations_failed
            or self.migrations_lost
            or self.actions_error
            or self.actions_ok
        )


def as_utc(stamp: datetime.datetime | None) -> datetime.datetime | None:
    """SQLite returns naive UTC timestamps; PostgreSQL aware ones."""
    if stamp is None or stamp.tzinfo is not None:
        return stamp
    return stamp.replace(tzinfo=datetime.UTC)


def up_hosts(
    services: Sequence[Mapping[str, Any]], now: datetime.datetime, service_down_time: float
) -> frozenset[str]:
    """Hosts whose compute service is up at ``now`` (``Service.is_up_at``'s test)."""
    up: set[str] = set()
    for row in services:
        seen = as_utc(row["last_seen_up"])
        if row["forced_down"] or seen is None:
            continue
        if (now - seen).total_seconds() <= service_down_time:
            up.add(str(row["host"]))
    return frozenset(up)


def _age(now: datetime.datetime, row: Mapping[str, Any]) -> float:
    stamp = as_utc(row.get("changed_at"))
    return (now - stamp).total_seconds() if stamp is not None else float("inf")


def _instance_rule(
    row: Mapping[str, Any], age: float, up: frozenset[str], b: Bounds, taken_ok: bool
) -> str | None:
    state, host = row["task_state"], row["host"]
    host_up = host in up
    if state == TaskState.SCHEDULING:
        if row["vm_state"] != VMState.BUILDING:
            return None
        if host is None:
            return BUILD_UNASSIGNED if age >= b.unassigned_build_after else None
        if not host_up:
            return BUILD_HOST_DOWN
        if row["recast"]:
            return BUILD_NOT_TAKEN if age >= b.build_reschedule_after else None
        return BUILD_CAST_LOST if age >= b.build_recast_after else None
    if state == TaskState.DELETING and host is not None and host_up:
        return DELETE_NOT_FINISHED if age >= b.delete_recast_after else None
    if host is None or host_up or not taken_ok:
        return None
    if state == TaskState.BLOCK_DEVICE_MAPPING and age >= b.build_host_down_after:
        return BUILD_TAKEN_HOST_DOWN
    if state == TaskState.SPAWNING and age >= b.build_host_down_after:
        return SPAWN_HOST_DOWN
    if state == TaskState.DELETING and age >= b.delete_host_down_after:
        return DELETE_HOST_DOWN
    return None


def plan(snapshot: Snapshot, bounds: Bounds, *, trust_down: bool = True) -> Plan:
    """Decide what to do with the rows of one pass (see the module docstring).

    Two guards against taking a control-plane outage for dead hosts (agents report through
    the conductors and the broker: when those were down, every host's report is stale):

    * ``trust_down`` False (this conductor has not yet been working for ``service_down_time``,
      e.g. just started or just past a database outage): no host counts as down.
    * When *every* compute host looks down, work a host has taken (spawning, deleting,
      migrating) is left alone; builds nobody took are still placed (or fail: no host).
    """
    now = snapshot.now
    up = up_hosts(snapshot.services, now, bounds.service_down_time)
    if not trust_down:
        up = frozenset(str(row["host"]) for row in snapshot.services) | _hosts_of(snapshot)
    out = Plan(batches={SPAWN_HOST_DOWN: {}, DELETE_HOST_DOWN: {}})
    taken_ok = bool(up)
    if not taken_ok and snapshot.services:
        out.held = "every compute host looks down: suspecting the control plane"
    for row in snapshot.instances:
        rule = _instance_rule(row, _age(now, row), up, bounds, taken_ok)
        if rule is None:
            continue
        if rule in out.batches:
            out.batches[rule][str(row["uuid"])] = f"{row['vm_state']}/{row['task_state']}"
            continue
        out.moves.append(
            Move(
                rule=rule,
                uuid=str(row["uuid"]),
                task_state=str(row["task_state"]),
                host=row["host"],
                updated_at=row["updated_at"],
                request_id=row.get("create_request_id"),
                user_id=row.get("user_id"),
                project_id=row.get("project_id"),
            )
        )
    for row in snapshot.migrations:
        source, dest = row["source_compute"], row["dest_compute"]
        if not taken_ok or source in up or (dest is not None and dest in up):
            continue
        if row["task_state"] != TaskState.MIGRATING:
            continue  # the instance moved on; the migration row is the agents' to settle
        target = (
            out.migrations_failed if row["status"] in MIGRATION_BEFORE_COPY else out.migrations_lost
        )
        target[str(row["uuid"])] = (str(row["instance_uuid"]), str(row["status"]))
    for row in snapshot.actions:
        failed = row["last_result"] == "Error" or row["vm_state"] == VMState.ERROR
        target_actions = out.actions_error if failed else out.actions_ok
        target_actions[int(row["id"])] = (str(row["instance_uuid"]), str(row["action"]))
    return out


def _hosts_of(snapshot: Snapshot) -> frozenset[str]:
    """Every host the rows name (all taken as up while hosts cannot be judged)."""
    hosts = {row["host"] for row in snapshot.instances}
    for row in snapshot.migrations:
        hosts |= {row["source_compute"], row["dest_compute"]}
    return frozenset(str(h) for h in hosts if h is not None)
