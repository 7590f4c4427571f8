"""The fleet as the conductor's database holds it, exported for dashboards and alerts.

Every conductor runs one census per ``[service] report_interval``: three reads (services, live
instances counted by state in the database, migrations not finished) turned into gauges.
Several conductors export the same values; take ``max`` over them in queries
(``deploy/monitoring/``).

    fleet_services{binary,state}                       services up / down (down: no report
                                                       for service_down_time, forced down, or
                                                       stopped: a graceful stop marks it down)
    fleet_instances{vm_state}                          instances by vm_state
    fleet_instance_task_states{task_state}             instances with a task in progress
    fleet_instance_task_oldest_seconds{task_state}     since the oldest of them last changed:
                                                       work stuck in a transitional state
    fleet_migrations_in_progress{status}               migrations not finished, by status
    fleet_migration_progress_ratio{migration,instance,source,dest}
                                                       memory copied / memory total, per
                                                       migration in flight (0 until known)
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import ARRAY, any_, bindparam, false, func, select

from conductor.db.where import table_for
from shared_objects import fields, releases
from shared_objects.runtime.metrics import ServiceMetrics

__all__ = ["IN_PROGRESS", "Census"]

IN_PROGRESS = (
    fields.MigrationStatus.ACCEPTED,
    fields.MigrationStatus.QUEUED,
    fields.MigrationStatus.PREPARING,
    fields.MigrationStatus.RUNNING,
    fields.MigrationStatus.POST_MIGRATING,
)
_BINARIES = {releases.BINARY_COMPUTE, releases.BINARY_CONDUCTOR}
_MIGRATION_COLUMNS = [
    "uuid",
    "instance_uuid",
    "source_compute",
    "dest_compute",
    "status",
    "memory_total",
    "memory_processed",
]


class Census:
    """Counts what the database holds into gauges of the conductor's registry."""

    def __init__(self, metrics: ServiceMetrics, *, service_down_time: float) -> None:
        self._metrics = metrics
        self._down_after = datetime.timedelta(seconds=service_down_time)
        registry: CollectorRegistry = metrics.registry
        self.services = Gauge(
            "fleet_services",
            "Services by binary and state (up, down), as the services table says (census).",
            ["binary", "state"],
            registry=registry,
        )
        self.task_states = Gauge(
            "fleet_instance_task_states",
            "Instances with a task in progress, by task_state (conductor census).",
            ["task_state"],
            registry=registry,
        )
        self.task_oldest = Gauge(
            "fleet_instance_task_oldest_seconds",
            "Seconds since the oldest instance in each task_state last changed (stuck work).",
            ["task_state"],
            registry=registry,
        )
        self.migrations = Gauge(
            "fleet_migrations_in_progress",
            "Migrations not finished, by status (conductor census).",
            ["status"],
            registry=registry,
        )
        self.progress = Gauge(
            "fleet_migration_progress_ratio",
            "Memory copied over memory total of each migration in flight (0 until known).",
            ["migration", "instance", "source", "dest"],
            registry=registry,
        )
        for status in IN_PROGRESS:
            self.migrations.labels(status=status)

    async def run_once(self, ctxt: Any, now: datetime.datetime | None = None) -> None:
        """One census: three reads, every gauge replaced."""
        services = await ctxt.db.run_statement(
            ("census_services",), "services", _services, {}, rows=True
        )
        # Counted by the database: one row per (vm_state, task_state), not one per instance
        # (a census every report interval must not grow with the instances).
        instances = await ctxt.db.run_statement(
            ("census_instances",), "instances", _instances_by_state, {}, rows=True
        )
        migrations = await ctxt.db.run_statement(
            ("census_migrations",),
            "migrations",
            _migrations_in_progress,
            {"statuses": list(IN_PROGRESS)},
            rows=True,
        )
        now = now or datetime.datetime.now(datetime.UTC)
        self.record_services(services, now)
        self.record(instances, migrations, now)

    def record_services(
        self, services: Iterable[Mapping[str, Any]], now: datetime.datetime
    ) -> None:
        counts: dict[tuple[str, ...], float] = {}
        for binary in {str(row["binary"]) for row in services} | _BINARIES:
            counts[(binary, "up")] = counts[(binary, "down")] = 0.0
        for row in services:
            seen = row["last_seen_up"]
            up = (
                not row["forced_down"]
                and seen is not None
                and now - _aware(seen) <= self._down_after
            )
            counts[(str(row["binary"]), "up" if up else "down")] += 1
        _replace(self.services, counts)

    def record(
        self,
        # One row per (vm_state, task_state): count, oldest_change (_instances_by_state).
        instances: Iterable[Mapping[str, Any]],
        migrations: Iterable[Mapping[str, Any]],
        now: datetime.datetime,
    ) -> None:
        states: dict[str, int] = {}
        tasks: dict[str, int] = {}
        oldest: dict[str, float] = {}
        for row in instances:
            state, count = str(row["vm_state"]), int(row["count"])
            states[state] = states.get(state, 0) + count
            task = row["task_state"]
            if not task:
                continue
            tasks[task] = tasks.get(task, 0) + count
            changed = row["oldest_change"]
            age = (now - _aware(changed)).total_seconds() if changed is not None else 0.0
            oldest[task] = max(oldest.get(task, 0.0), age)
        self._metrics.set_instances(states)
        _replace(self.task_states, {(t,): float(n) for t, n in tasks.items()})
        _replace(self.task_oldest, {(t,): age for t, age in oldest.items()})
        by_status = dict.fromkeys(IN_PROGRESS, 0)
        progress: dict[tuple[str, ...], float] = {}
        for row in migrations:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
            total, done = row["memory_total"], row["memory_processed"]
            ratio = min(done / total, 1.0) if total and done is not None else 0.0
            key = (
                row["uuid"],
                row["instance_uuid"],
                row["source_compute"] or "",
                row["dest_compute"] or "",
            )
            progress[key] = ratio
        for status, count in by_status.items():
            self.migrations.labels(status=status).set(count)
        _replace(self.progress, progress)


def _services(_arrays: bool) -> Any:
    s = table_for("services")
    return select(s.c.binary, s.c.last_seen_up, s.c.forced_down).where(s.c.deleted == false())


def _instances_by_state(_arrays: bool) -> Any:
    i = table_for("instances")
    changed = func.coalesce(i.c.updated_at, i.c.created_at)
    return (
        select(
            i.c.vm_state,
            i.c.task_state,
            func.count().label("count"),
            func.min(changed).label("oldest_change"),
        )
        .where(i.c.deleted == false())
        .group_by(i.c.vm_state, i.c.task_state)
    )


def _migrations_in_progress(arrays: bool) -> Any:
    """Migrations not finished (the reconciler scans the same rows, conductor/reconcile)."""
    m = table_for("migrations")
    statuses = (
        m.c.status == any_(bindparam("statuses", type_=ARRAY(m.c.status.type)))
        if arrays
        else m.c.status.in_(bindparam("statuses", expanding=True))
    )
    columns = [m.c[name] for name in _MIGRATION_COLUMNS]
    return select(*columns).where(m.c.deleted == false(), statuses).order_by(m.c.id)


def _aware(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)


def _replace(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Set exactly these label sets: series of finished work disappear instead of lingering."""
    gauge.clear()
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
