"""The conductor's census: instances by state, stuck tasks by age, migrations with progress."""

from __future__ import annotations

import datetime

from conductor.census import Census
from shared_objects.runtime.metrics import ServiceMetrics

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)


def ago(seconds: float) -> datetime.datetime:
    return NOW - datetime.timedelta(seconds=seconds)


def instance(vm: str, task: str | None, changed: float) -> dict[str, object]:
    """One instance as the census's GROUP BY row of it."""
    return {"vm_state": vm, "task_state": task, "count": 1, "oldest_change": ago(changed)}


def migration(uuid: str, total: int | None, done: int | None) -> dict[str, object]:
    return {
        "uuid": uuid,
        "instance_uuid": f"i-{uuid}",
        "source_compute": "c1",
        "dest_compute": "c2",
        "status": "running",
        "memory_total": total,
        "memory_processed": done,
    }


def test_census_exports_states_task_ages_and_migration_progress() -> None:
    metrics = ServiceMetrics("conductor", host="c1")
    census = Census(metrics, service_down_time=60)
    census.record(
        [
            instance("active", None, 5),
            instance("building", "spawning", 30),
            instance("building", "spawning", 900),
            instance("active", "migrating", 60),
        ],
        [migration("m1", 1000, 250), migration("m2", None, None)],
        NOW,
    )
    text = metrics.render().decode()
    assert 'fleet_instances{vm_state="building"} 2.0' in text
    assert 'fleet_instance_task_states{task_state="spawning"} 2.0' in text
    assert 'fleet_instance_task_oldest_seconds{task_state="spawning"} 900.0' in text
    assert 'fleet_migrations_in_progress{status="running"} 2.0' in text
    assert 'fleet_migrations_in_progress{status="queued"} 0.0' in text
    assert (
        'fleet_migration_progress_ratio{dest="c2",instance="i-m1",migration="m1",source="c1"} 0.25'
        in text
    )

    # The next census has none of that work left: its series go, the counts drop to 0.
    census.record([instance("active", None, 5)], [], NOW)
    text = metrics.render().decode()
    assert "fleet_migration_progress_ratio{" not in text
    assert "fleet_instance_task_oldest_seconds{" not in text
    assert 'fleet_instances{vm_state="building"} 0.0' in text
    assert 'fleet_migrations_in_progress{status="running"} 0.0' in text


def test_census_counts_services_up_and_down() -> None:
    metrics = ServiceMetrics("conductor", host="c1")
    census = Census(metrics, service_down_time=60)
    census.record_services(
        [
            {"binary": "fleet-compute", "last_seen_up": ago(10), "forced_down": False},
            {"binary": "fleet-compute", "last_seen_up": ago(61), "forced_down": False},
            # A graceful stop clears last_seen_up: down at once.
            {"binary": "fleet-compute", "last_seen_up": None, "forced_down": False},
            {"binary": "fleet-compute", "last_seen_up": ago(1), "forced_down": True},
            {"binary": "fleet-conductor", "last_seen_up": ago(1), "forced_down": False},
        ],
        NOW,
    )
    text = metrics.render().decode()
    assert 'fleet_services{binary="fleet-compute",state="up"} 1.0' in text
    assert 'fleet_services{binary="fleet-compute",state="down"} 3.0' in text
    assert 'fleet_services{binary="fleet-conductor",state="up"} 1.0' in text
    assert 'fleet_services{binary="fleet-conductor",state="down"} 0.0' in text
