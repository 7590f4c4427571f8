"""A gracefully stopped agent is down at once, and up again when it starts (issue 13, 3)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from shared_objects.objects.service import Service

pytestmark = pytest.mark.integration


async def _service(cluster: Any, host: str) -> Service:
    return await Service.get_by_host_and_binary(cluster.ctxt, host, "fleet-compute")


async def test_sigterm_marks_the_agent_down_at_once_and_restart_marks_it_up(
    cluster_factory: Any,
) -> None:
    # A long service_down_time: "down" can only come from the agent's own mark.
    async with cluster_factory(service_down_time=300.0) as cluster:
        assert (await _service(cluster, "compute-1")).is_up
        stopped_at = time.monotonic()
        assert await cluster.stop_process("compute-1") == 0
        service = await _service(cluster, "compute-1")
        assert service.last_seen_up is None and not service.is_up
        assert time.monotonic() - stopped_at < 30
        assert (await _service(cluster, "compute-2")).is_up
        await cluster.start_agent("compute-1")
        assert (await _service(cluster, "compute-1")).is_up
