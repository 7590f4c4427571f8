"""The campaign's own logic, without services: how operations are judged, how loads split,
what the report says. (The campaign itself: test_campaign_quick.py, run_campaign.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from campaign.report import Row, table, to_json
from campaign.workload import (
    FAILED_CLEAN,
    LOST,
    STUCK,
    SUCCEEDED,
    DbState,
    Load,
    OpRecord,
    _outcome,
    _split,
)


def _instance(uuid: str, vm: str, task: str | None = None, deleted: bool = False) -> dict[str, Any]:
    return {"uuid": uuid, "vm_state": vm, "task_state": task, "host": "h1", "deleted": deleted}


STATE = DbState(
    instances={
        "a": _instance("a", "active"),
        "b": _instance("b", "error"),
        "c": _instance("c", "error"),
        "d": _instance("d", "building", "spawning"),
        "e": _instance("e", "deleted", deleted=True),
        "f": _instance("f", "active", "migrating"),
    },
    faults={"b"},
    migrations={
        "m1": {"uuid": "m1", "status": "completed"},
        "m2": {"uuid": "m2", "status": "error"},
        "m3": {"uuid": "m3", "status": "running"},
    },
)


def _boot(*uuids: str, error: str | None = None, requested: int = 0) -> OpRecord:
    record = OpRecord("boot", None, 0.0, api_error=error, requested=requested or len(uuids))
    record.instances = list(uuids)
    return record


@pytest.mark.parametrize(
    ("record", "outcome"),
    [
        (_boot("a"), SUCCEEDED),
        (_boot("a", "b"), FAILED_CLEAN),  # ERROR with a fault: a clean failure
        (_boot("a", "c"), LOST),  # ERROR and no fault: the user is told nothing
        (_boot("a", "b", "d"), STUCK),  # the worst outcome names the record
        (_boot(error="MessagingTimeout: x", requested=3), FAILED_CLEAN),
        (OpRecord("delete", "e", 0.0), SUCCEEDED),
        (OpRecord("delete", "a", 0.0, api_error="MessagingError: x"), FAILED_CLEAN),
        (OpRecord("delete", "a", 0.0), LOST),  # accepted, never done
        (OpRecord("delete", "d", 0.0, api_error="x"), STUCK),
        (OpRecord("live_migrate", "a", 0.0, migration="m1"), SUCCEEDED),
        (OpRecord("live_migrate", "a", 0.0, migration="m2"), FAILED_CLEAN),
        (OpRecord("live_migrate", "a", 0.0, migration="m3"), STUCK),
        (OpRecord("live_migrate", "f", 0.0, migration="m1"), STUCK),
        (OpRecord("live_migrate", "a", 0.0, migration="nope"), LOST),
        (OpRecord("attach", "a", 0.0), SUCCEEDED),
        (OpRecord("detach", "a", 0.0, api_error="InvalidRequest: busy"), FAILED_CLEAN),
    ],
)
def test_each_operation_is_judged_by_what_the_database_says(record: OpRecord, outcome: str) -> None:
    assert _outcome(record, STATE)[0] == outcome


def test_a_boot_counts_one_operation_per_instance_even_when_refused() -> None:
    assert _boot("a", "b").weight == 2
    assert _boot(error="x", requested=5).weight == 5
    assert OpRecord("delete", "a", 0.0).weight == 1


def test_loads_split_evenly_and_need_enough_base_instances() -> None:
    assert _split(20, 4) == [5, 5, 5, 5]
    assert _split(7, 3) == [3, 2, 2]
    assert _split(2, 4) == [1, 1]
    assert _split(0, 4) == []
    with pytest.raises(ValueError):
        Load(base=3, storm=1, storm_calls=1, deletes=2, migrations=1, volumes=1)


def test_the_report_shows_every_fault_and_details_only_the_red_ones() -> None:
    green = Row("broker restart", "down 3 s", "boot 6", 14, 14, recovery_s=2.0, invariants_ok=True)
    red = Row(
        "PostgreSQL restart",
        "down 2 s",
        "boot 6",
        14,
        10,
        3,
        1,
        stuck_instances=1,
        violations=["migration m of u: left in status 'running'"],
    )
    text = table([green, red])
    assert "broker restart" in text and "2.0 s" in text and "never" in text
    assert "1/2 faults green, 1 instance(s) stuck" in text
    assert "== PostgreSQL restart" in text and "left in status 'running'" in text
    assert "== broker restart" not in text
    doc = json.loads(to_json([green, red], mode="quick"))
    assert doc["green"] is False and doc["stuck_instances"] == 1 and len(doc["rows"]) == 2
