"""Real agents on RabbitMQ and PostgreSQL beat with ``report_alive``: their beats land in the
services table, several per UPDATE, and none takes the ``Service.heartbeat`` object path."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from ops_cluster import OpsClusterFactory, ahttp_get
from prometheus_client.parser import text_string_to_metric_families

from shared_objects.objects.service import ServiceList
from shared_objects.releases import BINARY_COMPUTE

pytestmark = pytest.mark.integration

HOSTS = ("compute-1", "compute-2", "compute-3")


def counter(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def test_real_agents_beats_land_batched(ops_cluster: OpsClusterFactory) -> None:
    async with ops_cluster(
        metrics=True, hosts=HOSTS, report_interval=0.5, service_down_time=5.0
    ) as cluster:
        port = cluster.metrics_ports["conductor-1"]
        before = {s.host: s.report_count for s in await _computes(cluster)}
        _, text = await ahttp_get(port, "/metrics")
        beats0 = counter(text, "fleet_liveness_beats_total")
        flushes0 = counter(text, "fleet_liveness_flushes_total")
        await asyncio.sleep(6.0)  # a measuring window: a dozen beats per agent
        _, text = await ahttp_get(port, "/metrics")
        beats = counter(text, "fleet_liveness_beats_total") - beats0
        flushes = counter(text, "fleet_liveness_flushes_total") - flushes0
        services = await _computes(cluster)
        now = datetime.datetime.now(datetime.UTC)
        heartbeats = [
            line
            for line in cluster.log_lines("conductor-1")
            if line.get("event") == "audit" and line.get("action") == "Service.heartbeat"
        ]

    # ~12 beats per host in 6 s; each landed (report_count) and the rows are fresh.
    assert beats >= 8 * len(HOSTS) and flushes > 0
    for service in services:
        assert service.report_count - before[service.host] >= 6, service.host
        assert service.last_seen_up is not None
        assert (now - service.last_seen_up).total_seconds() < 3.0, service.host
    # Several hosts' beats per statement (three hosts at 0.5 s, flushed every 0.5 s).
    assert beats / flushes >= 1.8, (beats, flushes)
    # Nobody used the object path for liveness.
    assert heartbeats == []


async def _computes(cluster: object) -> list[object]:
    services = await ServiceList.get_by_binary(
        cluster.ctxt,  # type: ignore[attr-defined]
        BINARY_COMPUTE,
        include_disabled=True,
    )
    return sorted(services, key=lambda s: s.host)
