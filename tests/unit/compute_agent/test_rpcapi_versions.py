"""Compute RPC 1.1 degrades for 1.0 peers; 1.1 objects backport to 1.0 without their fields."""

from __future__ import annotations

import uuid
from typing import Any

from compute_agent.rpcapi import ComputeAPI
from shared_objects.config import MessagingConfig
from shared_objects.context import RequestContext
from shared_objects.messaging import RPCServer, Target, expose, get_transport
from shared_objects.objects.live_migrate_data import LiveMigrateData
from shared_objects.objects.migration import Migration


class OldAgent:
    """A compute endpoint of API 1.0: live_migration_abort has no reason."""

    target = Target(version="1.0")

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    @expose
    async def live_migration_abort(self, ctxt: RequestContext, migration_uuid: str) -> None:
        self.calls.append({"migration_uuid": migration_uuid})


class NewAgent(OldAgent):
    target = Target(version="1.1")

    @expose
    async def live_migration_abort(  # type: ignore[override]
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        self.calls.append({"migration_uuid": migration_uuid, "reason": reason})


async def _abort(endpoint: OldAgent, cap: str | None) -> list[dict[str, Any]]:
    cfg = MessagingConfig(transport_url=f"memory://{uuid.uuid4().hex}")
    async with get_transport(cfg) as transport:
        async with RPCServer(transport, Target(topic="compute", server="h"), [endpoint]):
            api = ComputeAPI(transport, version_cap=cap, timeout=5)
            await api.live_migration_abort(
                RequestContext(), "h", migration_uuid="m1", timeout=5, reason="maintenance"
            )
    return endpoint.calls


async def test_abort_reason_is_left_out_while_capped_at_1_0() -> None:
    assert await _abort(OldAgent(), "1.0") == [{"migration_uuid": "m1"}]


async def test_abort_reason_reaches_a_1_1_agent_when_uncapped() -> None:
    calls = await _abort(NewAgent(), None)
    assert calls == [{"migration_uuid": "m1", "reason": "maintenance"}]


def test_migration_and_live_migrate_data_1_1_fields_are_dropped_for_1_0() -> None:
    migration = Migration(disk_total=10, disk_processed=5, disk_remaining=5, status="running")
    data = migration.obj_to_primitive(target_version="1.0")["versioned_object.data"]
    assert not {"disk_total", "disk_processed", "disk_remaining"} & set(data)
    lmd = LiveMigrateData.from_driver_data({"source_host": "a", "bandwidth_limit_mb_s": 50})
    old = lmd.obj_to_primitive(target_version="1.0")["versioned_object.data"]
    assert "bandwidth_limit_mb_s" not in old and old["source_host"] == "a"
    assert lmd.to_driver_data()["bandwidth_limit_mb_s"] == 50
