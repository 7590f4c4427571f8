"""ServiceReporter: registers the service row and heartbeats through the conductor."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from conductor.testing import LocalConductor
from shared_objects import releases
from shared_objects.context import RequestContext
from shared_objects.objects import Service
from shared_objects.objects.service import ServiceReporter
from shared_objects.testing.eventually import eventually


@contextlib.asynccontextmanager
async def agent_context() -> AsyncIterator[Any]:
    yield RequestContext()


async def test_reporter_registers_and_heartbeats_at_its_interval(conductor: LocalConductor) -> None:
    reporter = ServiceReporter(
        agent_context,
        host="h1",
        binary=releases.BINARY_COMPUTE,
        topic="compute",
        version=releases.SERVICE_VERSION,
        interval=0.05,
    )
    service = await reporter.start()
    try:
        assert service.version == releases.SERVICE_VERSION and service.is_up

        async def reported_thrice() -> Service:
            row = await Service.get_by_host_and_binary(
                RequestContext(), "h1", releases.BINARY_COMPUTE
            )
            assert row.report_count >= 3, row.report_count
            return row

        row = await eventually(reported_thrice)
    finally:
        await reporter.stop()
    assert reporter.failures == 0
    assert row.last_seen_up is not None and row.last_seen_up >= service.last_seen_up
    minimum = await Service.get_minimum_version(RequestContext(), releases.BINARY_COMPUTE)
    assert minimum == releases.SERVICE_VERSION
