"""The reconciler's decisions on rows alone (no database)."""

from __future__ import annotations

import datetime
from typing import Any

from conductor.reconcile import rules
from conductor.reconcile.rules import Bounds, Snapshot

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
BOUNDS = Bounds(service_down_time=60, build_recast_after=30, build_reschedule_after=60)


def _service(host: str, seen_ago: float | None, forced_down: bool = False) -> dict[str, Any]:
    seen = None if seen_ago is None else NOW - datetime.timedelta(seconds=seen_ago)
    return {"host": host, "last_seen_up": seen, "forced_down": forced_down}


def _instance(host: str | None, task_state: str, age: float, recast: bool = False) -> Any:
    changed = NOW - datetime.timedelta(seconds=age)
    return {
        "uuid": f"{host}-{task_state}-{age}",
        "host": host,
        "vm_state": "building",
        "task_state": task_state,
        "updated_at": changed,
        "changed_at": changed,
        "create_request_id": "req-1",
        "recast": recast,
    }


def test_a_host_is_up_only_when_it_reported_recently_and_is_not_forced_or_marked_down() -> None:
    services = [
        _service("fresh", 5),
        _service("stale", 61),
        _service("forced", 5, forced_down=True),
        _service("marked", None),
    ]
    assert rules.up_hosts(services, NOW, 60) == {"fresh"}


def test_naive_timestamps_from_sqlite_are_utc() -> None:
    naive = (NOW - datetime.timedelta(seconds=5)).replace(tzinfo=None)
    services = [{"host": "h", "last_seen_up": naive, "forced_down": False}]
    assert rules.up_hosts(services, NOW, 60) == {"h"}


def test_scheduling_rules_by_host_state_and_age() -> None:
    snapshot = Snapshot(
        NOW,
        [_service("up", 1), _service("down", 600)],
        [
            _instance("down", "scheduling", 2),
            _instance("up", "scheduling", 10),
            _instance("up", "scheduling", 31),
            _instance("up", "scheduling", 31, recast=True),
            _instance("up", "scheduling", 61, recast=True),
            _instance(None, "scheduling", 121),
        ],
    )
    plan = rules.plan(snapshot, BOUNDS)
    assert [(m.rule, m.uuid) for m in plan.moves] == [
        (rules.BUILD_HOST_DOWN, "down-scheduling-2"),
        (rules.BUILD_CAST_LOST, "up-scheduling-31"),
        (rules.BUILD_NOT_TAKEN, "up-scheduling-61"),
        (rules.BUILD_UNASSIGNED, "None-scheduling-121"),
    ]


def test_a_spawn_on_an_up_host_is_never_touched_however_old() -> None:
    snapshot = Snapshot(NOW, [_service("up", 1)], [_instance("up", "spawning", 10_000)])
    assert rules.plan(snapshot, BOUNDS).empty


def test_a_delete_on_an_up_host_is_sent_again_once_its_bound_passed() -> None:
    young = _instance("up", "deleting", BOUNDS.delete_recast_after - 1)
    old = _instance("up", "deleting", BOUNDS.delete_recast_after + 1)
    plan = rules.plan(Snapshot(NOW, [_service("up", 1)], [young, old]), BOUNDS)
    assert [(m.rule, m.uuid) for m in plan.moves] == [(rules.DELETE_NOT_FINISHED, old["uuid"])]
    assert not any(plan.batches.values())


def test_migration_is_settled_only_when_both_hosts_are_down() -> None:
    def migration(source: str, dest: str | None, status: str) -> dict[str, Any]:
        return {
            "uuid": f"{source}-{dest}-{status}",
            "instance_uuid": "i",
            "source_compute": source,
            "dest_compute": dest,
            "status": status,
            "task_state": "migrating",
        }

    snapshot = Snapshot(
        NOW,
        [_service("up", 1), _service("down", 600)],
        [],
        migrations=[
            migration("down", "up", "running"),
            migration("down", None, "accepted"),
            migration("down", "down", "running"),
        ],
    )
    plan = rules.plan(snapshot, BOUNDS)
    assert list(plan.migrations_failed) == ["down-None-accepted"]
    assert list(plan.migrations_lost) == ["down-down-running"]
