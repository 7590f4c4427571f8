"""The scheduler's cached view of the fleet: HostStates kept in memory, refreshed by deltas.

Reading every ComputeNode and Service row for every scheduling decision costs O(hosts) rows per
request. ``HostView`` keeps the rows in memory instead and, at most every ``refresh_interval``
seconds (when a decision asks for the view), reads only what changed:

* **Rows changed since the last read** (two statements, both on an index of
  ``coalesce(deleted_at, updated_at, created_at)``, ``conductor.db.models.changed_at``): new,
  updated and deleted compute nodes; registered, disabled, forced or marked-down compute
  services. Writers stamp rows with their own clock and commit a moment later, so a read asks
  for rows stamped after *the database's clock at the previous read minus* ``overlap``: a change
  is missed only if its stamp is more than ``overlap`` older than its commit (clock skew between
  a writer and the database plus commit delay). A full read every ``full_refresh_interval``
  seconds is the backstop for that, and for anything else a delta could miss.
* **Liveness** comes from ``services.last_seen_up``, which heartbeats advance without touching
  ``updated_at``. A cached stamp can only be older than the real one, so a host the cache sees
  up is up (a mark-down or a forced-down comes with ``updated_at``); only hosts whose cached
  stamp is near ``service_down_time`` ("ageing") are asked about again, in the services
  statement, and only those that beat since come back. A healthy host is re-read about once per
  half ``service_down_time``, whatever the request rate.

The states handed out are shared between requests and must not be changed: the scheduler and
the ``PlacementLedger`` copy a host before consuming its capacity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    and_,
    any_,
    bindparam,
    false,
    func,
    literal,
    or_,
    select,
)

from conductor.db import models
from conductor.scheduler import HostState, weight_key
from shared_objects.releases import BINARY_COMPUTE

log = structlog.get_logger(__name__)

Row = dict[str, Any]

_NODES = models.metadata.tables["compute_nodes"]
_SERVICES = models.metadata.tables["services"]

_NODE_COLUMNS = (
    "id",
    "host",
    "hypervisor_hostname",
    "vcpus",
    "memory_mb",
    "local_gb",
    "vcpus_used",
    "memory_mb_used",
    "local_gb_used",
    "cpu_allocation_ratio",
    "ram_allocation_ratio",
    "disk_allocation_ratio",
    "updated_at",
    "deleted",
)
_SERVICE_COLUMNS = ("id", "host", "binary", "disabled", "forced_down", "last_seen_up", "deleted")


@dataclasses.dataclass(slots=True)
class HostViewSettings:
    """How fresh the view is, and what it costs."""

    service_down_time: float = 60.0
    #: A decision sees rows changed up to this many seconds before it (at most one delta
    #: read per interval, however many decisions).
    refresh_interval: float = 1.0
    #: Rows stamped this long before the previous read are read again (clock skew + commit
    #: delay of the writers).
    overlap: float = 2.0
    #: Everything is read again this often (the backstop for a change a delta missed).
    full_refresh_interval: float = 60.0


@dataclasses.dataclass(slots=True)
class FleetView:
    """Host states as read, and when each host last reported its usage.

    From ``HostView``, also: the states are in the weigher's order, ``floors`` holds each
    one's ``weight_key`` (for ``select_destinations``) and ``positions`` where each host's
    states are (for ``PlacementLedger.apply``); both shared, read-only."""

    states: list[HostState]
    reported_at: Mapping[str, datetime.datetime]
    floors: Sequence[tuple[float, str]] | None = None
    positions: Mapping[str, Sequence[int]] | None = None


@dataclasses.dataclass(slots=True)
class RefreshStats:
    """What the view read so far (tests and the benchmark check these)."""

    full_reads: int = 0
    delta_reads: int = 0
    statements: int = 0
    node_rows: int = 0
    service_rows: int = 0
    #: The last read: the stamp it asked for rows changed after (None: a full read), how many
    #: hosts it asked about the liveness of, and the rows it got.
    last_since: datetime.datetime | None = None
    last_ageing: int = 0
    last_node_rows: int = 0
    last_service_rows: int = 0


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _aware(value: datetime.datetime | None) -> datetime.datetime | None:
    # SQLite hands back naive datetimes (in UTC, as written).
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value


def _member(col: Any, name: str, arrays: bool) -> ColumnElement[bool]:
    if arrays:
        return col == any_(bindparam(name, type_=ARRAY(col.type)))
    return col.in_(bindparam(name, expanding=True, type_=col.type))


def nodes_statement(delta: bool) -> Callable[[bool], Any]:
    """The live compute nodes (full) or every node changed since ``:since`` (delta, deleted
    ones included), each row with the database's clock; one row of NULLs and the clock when
    nothing matches (a left join from the clock)."""
    n = _NODES

    def build(_arrays: bool) -> Any:
        clock = select(func.now().label("db_now")).subquery("clock")
        if delta:
            match = models.changed_at(n) > bindparam("since", type_=n.c.updated_at.type)
        else:
            match = n.c.deleted == false()
        return select(clock.c.db_now, *(n.c[c] for c in _NODE_COLUMNS)).select_from(
            clock.outerjoin(n, match)
        )

    return build


def services_statement(delta: bool) -> Callable[[bool], Any]:
    """The live compute services (full), or those changed since ``:since`` plus those of
    ``:ageing`` hosts that reported since ``:up_since`` (delta)."""
    s = _SERVICES

    def build(arrays: bool) -> Any:
        compute = s.c.binary == literal(BINARY_COMPUTE)
        if not delta:
            return select(*(s.c[c] for c in _SERVICE_COLUMNS)).where(
                compute, s.c.deleted == false()
            )
        changed = models.changed_at(s) > bindparam("since", type_=s.c.updated_at.type)
        stamp = s.c.last_seen_up
        live = s.c.deleted == false()
        # Only rows whose stamp moved past the cached one: an ageing host that beat within
        # the last half down time, a host seen down that beat within the down time. Each arm
        # has its own index. The rows changed are of every binary (the few others are dropped
        # when read): a condition common to all arms would be factored out by PostgreSQL's
        # planner, which then reads every compute service through the ``binary`` index.
        ageing = and_(
            _member(s.c.host, "ageing", arrays),
            compute,
            live,
            stamp > bindparam("fresh_since", type_=stamp.type),
        )
        down = and_(
            _member(s.c.host, "down", arrays),
            compute,
            live,
            stamp >= bindparam("up_since", type_=stamp.type),
        )
        # In no particular order: a deleted row drops only the row cached under its id.
        return select(*(s.c[c] for c in _SERVICE_COLUMNS)).where(or_(changed, ageing, down))

    return build


@dataclasses.dataclass(slots=True)
class _Service:
    id: int
    disabled: bool
    forced_down: bool
    last_seen_up: datetime.datetime | None


class HostView:
    """One conductor's cached view of the compute hosts (see the module docstring)."""

    def __init__(
        self,
        settings: HostViewSettings | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        utcnow: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.settings = settings or HostViewSettings()
        self.stats = RefreshStats()
        self._monotonic = monotonic
        self._utcnow = utcnow
        self._lock = asyncio.Lock()
        self._nodes: dict[int, Row] = {}
        self._services: dict[str, _Service] = {}
        # Database clock of the last read (None: nothing read yet, the next read is full).
        self._since: datetime.datetime | None = None
        self._read_at = -float("inf")
        self._full_at = -float("inf")
        self._states: list[HostState] = []
        self._reported_at: dict[str, datetime.datetime] = {}
        self._floors: list[tuple[float, str]] = []
        self._positions: dict[str, list[int]] = {}
        self._dirty = True
        # The earliest moment a host seen up turns down by silence (rebuild the states then).
        self._next_expiry: datetime.datetime | None = None

    def invalidate(self) -> None:
        """Make the next decision read the changes at once (e.g. after a refusal that a fresher
        view might avoid)."""
        self._read_at = -float("inf")

    async def fleet(self, ctxt: Any, *, fresh: bool = False) -> FleetView:
        """The current view, refreshed first through ``ctxt.db`` if it is due (or ``fresh``).

        The returned list is the caller's; its states are shared and must not be changed."""
        db = ctxt.db
        if db is None:
            raise RuntimeError("the host view reads through the request's database (ctxt.db)")
        if fresh:
            self.invalidate()
        if self._monotonic() - self._read_at >= self.settings.refresh_interval:
            async with self._lock:
                # Another request may have refreshed while this one waited.
                if self._monotonic() - self._read_at >= self.settings.refresh_interval:
                    await self._refresh(db)
        now = self._utcnow()
        if self._dirty or (self._next_expiry is not None and now > self._next_expiry):
            self._rebuild(now)
        return FleetView(list(self._states), self._reported_at, self._floors, self._positions)

    async def _refresh(self, db: Any) -> None:
        started = self._monotonic()
        full = self._since is None or started - self._full_at >= self.settings.full_refresh_interval
        if full:
            await self._read_all(db)
            self._full_at = started
        else:
            await self._read_changes(db)
        self._read_at = started

    async def _read_all(self, db: Any) -> None:
        rows: list[Row] = await db.run_statement(
            ("host_view_nodes_all",), "compute_nodes", nodes_statement(False), {}, rows=True
        )
        services: list[Row] = await db.run_statement(
            ("host_view_services_all",), "services", services_statement(False), {}, rows=True
        )
        self._count(rows, services, since=None, ageing=0)
        self._nodes = {}
        self._services = {}
        self._apply(rows, services)
        self._since = self._clock(rows)

    async def _read_changes(self, db: Any) -> None:
        assert self._since is not None
        since = self._since - datetime.timedelta(seconds=self.settings.overlap)
        rows: list[Row] = await db.run_statement(
            ("host_view_nodes_changed",),
            "compute_nodes",
            nodes_statement(True),
            {"since": since},
            rows=True,
        )
        now = self._utcnow()
        down = datetime.timedelta(seconds=self.settings.service_down_time)
        # Hosts the cache sees up but would see down within half the down time, and hosts it
        # sees down: ask whether they beat since.
        fresh_since = now - down / 2
        up_since = now - down
        ageing: list[str] = []
        seen_down: list[str] = []
        for host, svc in self._services.items():
            if svc.last_seen_up is None or svc.last_seen_up < up_since:
                seen_down.append(host)
            elif svc.last_seen_up <= fresh_since:
                ageing.append(host)
        services: list[Row] = await db.run_statement(
            ("host_view_services_changed",),
            "services",
            services_statement(True),
            {
                "since": since,
                "ageing": ageing,
                "fresh_since": fresh_since,
                "down": seen_down,
                "up_since": up_since,
            },
            rows=True,
        )
        self._count(rows, services, since=since, ageing=len(ageing) + len(seen_down))
        self._apply(rows, services)
        self._since = self._clock(rows)

    def _count(
        self,
        rows: Sequence[Row],
        services: Sequence[Row],
        *,
        since: datetime.datetime | None,
        ageing: int,
    ) -> None:
        stats = self.stats
        stats.statements += 2
        if since is None:
            stats.full_reads += 1
        else:
            stats.delta_reads += 1
        stats.last_since = since
        stats.last_ageing = ageing
        stats.last_node_rows = sum(1 for r in rows if r["id"] is not None)
        stats.last_service_rows = len(services)
        stats.node_rows += stats.last_node_rows
        stats.service_rows += stats.last_service_rows

    @staticmethod
    def _clock(rows: Sequence[Row]) -> datetime.datetime:
        stamp = _aware(rows[0]["db_now"]) if rows else None
        if stamp is None:  # a left join from one row: never empty; be safe anyway
            return _utcnow()
        return stamp

    def _apply(self, rows: Sequence[Row], services: Sequence[Row]) -> None:
        changed = False
        for row in rows:
            node_id = row["id"]
            if node_id is None:
                continue
            changed = True
            if row["deleted"]:
                self._nodes.pop(node_id, None)
            else:
                self._nodes[node_id] = row
        for row in services:
            if row["binary"] != BINARY_COMPUTE:
                continue
            host = row["host"]
            cached = self._services.get(host)
            if row["deleted"]:
                # A host re-registered after a delete has a new row: drop only the one cached.
                if cached is not None and cached.id == row["id"]:
                    del self._services[host]
                    changed = True
                continue
            fresh = _Service(
                row["id"],
                bool(row["disabled"]),
                bool(row["forced_down"]),
                _aware(row["last_seen_up"]),
            )
            if cached != fresh:
                # A newer heartbeat may turn a host seen down up again: rebuild (at most once
                # per refresh).
                self._services[host] = fresh
                changed = True
        if changed:
            self._dirty = True

    def _rebuild(self, now: datetime.datetime) -> None:
        down = datetime.timedelta(seconds=self.settings.service_down_time)
        states: list[HostState] = []
        reported_at: dict[str, datetime.datetime] = {}
        next_expiry: datetime.datetime | None = None
        for row in self._nodes.values():
            host = row["host"]
            svc = self._services.get(host)
            if svc is None:
                continue
            up = (
                not svc.forced_down
                and svc.last_seen_up is not None
                and now - svc.last_seen_up <= down
            )
            if up:
                assert svc.last_seen_up is not None
                expiry = svc.last_seen_up + down
                if next_expiry is None or expiry < next_expiry:
                    next_expiry = expiry
            states.append(
                HostState(
                    host=host,
                    node=row["hypervisor_hostname"],
                    vcpus=row["vcpus"],
                    memory_mb=row["memory_mb"],
                    local_gb=row["local_gb"],
                    vcpus_used=row["vcpus_used"],
                    memory_mb_used=row["memory_mb_used"],
                    local_gb_used=row["local_gb_used"],
                    cpu_allocation_ratio=row["cpu_allocation_ratio"],
                    ram_allocation_ratio=row["ram_allocation_ratio"],
                    disk_allocation_ratio=row["disk_allocation_ratio"],
                    service_up=up,
                    service_disabled=svc.disabled,
                )
            )
            stamp = _aware(row["updated_at"])
            if stamp is not None:
                reported_at[host] = stamp
        states.sort(key=weight_key)
        positions: dict[str, list[int]] = {}
        for i, state in enumerate(states):
            positions.setdefault(state.host, []).append(i)
        self._states = states
        self._floors = [weight_key(s) for s in states]
        self._positions = positions
        self._reported_at = reported_at
        self._next_expiry = next_expiry
        self._dirty = False
