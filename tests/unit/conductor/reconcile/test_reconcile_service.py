"""The conductor runs its reconciler between start and stop, with ``[conductor]``'s bounds."""

from __future__ import annotations

import uuid

from conductor.db import migration
from conductor.service import ConductorService
from shared_objects.runtime.config import FleetConfig
from shared_objects.testing.eventually import eventually


async def test_conductor_starts_and_stops_its_reconciler(sqlite_database_url: str) -> None:
    await migration.upgrade(sqlite_database_url)
    cfg = FleetConfig(host="conductor-1")
    cfg.database.url = sqlite_database_url
    cfg.messaging.transport_url = f"memory://fleet-conductor-1@{uuid.uuid4().hex}"
    cfg.conductor.reconcile_interval = 0.05
    cfg.conductor.build_host_down_after = 7.0
    service = ConductorService(cfg, topic=f"conductor-{uuid.uuid4().hex[:6]}")
    assert service.reconciler.bounds.build_host_down_after == 7.0
    assert service.reconciler.bounds.service_down_time == cfg.service.service_down_time
    await service.start()
    try:
        task = service.reconciler._task
        assert task is not None and not task.done()
        passes = service.reconciler.passes.labels(outcome="ok")
        await eventually(lambda: passes._value.get() >= 2, 2, interval=0.02, what="two passes")
        assert b'fleet_reconciler_actions_total{rule="spawn_host_down"} 0.0' in (
            service.metrics.render()
        )
    finally:
        await service.stop(grace=1)
    assert service.reconciler._task is None and task.done()
