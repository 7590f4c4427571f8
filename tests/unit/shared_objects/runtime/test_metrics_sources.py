"""Pulled metrics: RPC server/client and transport stats() read at scrape time."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MemoryBroker,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.runtime.metrics import ServiceMetrics


def value(text: bytes, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError((name, labels))


class FakeSource:
    """A stats() callable whose totals the test moves."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"calls": {}, "dropped": {}, "in_flight": 0}

    def __call__(self) -> dict[str, Any]:
        return self.data


def test_pulled_call_totals_become_counter_increments() -> None:
    m, src = ServiceMetrics("conductor"), FakeSource()
    m.watch_rpc("server", src)
    src.data["calls"] = {"object_action:ok": 3, "object_action:error": 1}
    src.data["in_flight"] = 2
    first = m.render()
    ok = {"method": "object_action", "outcome": "ok", "role": "server"}
    assert value(first, "fleet_rpc_calls_total", **ok) == 3
    assert value(first, "fleet_rpc_in_flight", role="server") == 2
    src.data["calls"] = {"object_action:ok": 5, "object_action:error": 1}
    src.data["dropped"] = {"malformed": 1}
    src.data["in_flight"] = 0
    second = m.render()
    labels = {"method": "object_action", "role": "server"}
    assert value(second, "fleet_rpc_calls_total", outcome="ok", **labels) == 5
    assert value(second, "fleet_rpc_calls_total", outcome="error", **labels) == 1
    assert value(second, "fleet_rpc_dropped_total", reason="malformed", role="server") == 1
    assert value(second, "fleet_rpc_in_flight", role="server") == 0


def test_a_source_whose_totals_reset_keeps_the_counter_monotonic() -> None:
    m, src = ServiceMetrics("agent"), FakeSource()
    m.watch_rpc("server", src)
    src.data["calls"] = {"ping:ok": 10}
    m.render()
    src.data["calls"] = {"ping:ok": 2}  # e.g. the RPCServer object was replaced
    text = m.render()
    assert value(text, "fleet_rpc_calls_total", method="ping", outcome="ok", role="server") == 12


def test_transport_reconnects_and_publish_failures_are_pulled() -> None:
    m = ServiceMetrics("agent")
    stats = {"reconnects": 0, "publish_failures": 0, "published": 9}
    m.watch_transport(lambda: stats)
    m.render()
    stats.update(reconnects=2, publish_failures=1)
    text = m.render()
    assert value(text, "fleet_amqp_reconnects_total") == 2
    assert value(text, "fleet_amqp_publish_failures_total") == 1


def test_a_failing_source_does_not_break_the_scrape() -> None:
    m = ServiceMetrics("agent")

    def broken() -> dict[str, Any]:
        raise RuntimeError("gone")

    m.watch_rpc("client", broken)
    m.amqp_reconnects.inc()
    assert value(m.render(), "fleet_amqp_reconnects_total") == 1


def test_latency_observer_fills_only_the_histogram() -> None:
    m = ServiceMetrics("agent")
    observe = m.latency_observer("server")
    observe("build", 0.003)
    text = m.render()
    assert value(text, "fleet_rpc_latency_seconds_count", method="build", role="server") == 1
    bucket = {"method": "build", "role": "server", "le": "0.005"}
    assert value(text, "fleet_rpc_latency_seconds_bucket", **bucket) == 1
    with pytest.raises(KeyError):
        value(text, "fleet_rpc_calls_total", method="build", outcome="ok", role="server")


class Echo:
    @expose
    async def echo(self, ctxt: RequestContext, value: int) -> int:
        return value


async def test_real_rpc_server_and_client_stats_show_up_after_traffic() -> None:
    broker = MemoryBroker()
    cfg = MessagingConfig(transport_url="memory://metrics@unit/", control_exchange="metrics")
    server_t = get_transport(cfg, memory_broker=broker)
    client_t = get_transport(cfg, memory_broker=broker)
    async with server_t, client_t:
        server = RPCServer(server_t, Target(topic="t", server="s1"), [Echo()])
        async with server:
            client = RPCClient(client_t, Target(topic="t"), timeout=2.0)
            m = ServiceMetrics("compute-agent")
            m.watch_rpc("server", server.stats)
            m.watch_rpc("client", client.stats)
            m.watch_transport(client_t.stats)
            for i in range(3):
                assert await client.call(RequestContext(), "echo", value=i) == i
            text = m.render()
    assert value(text, "fleet_rpc_calls_total", method="echo", outcome="ok", role="server") == 3
    assert value(text, "fleet_rpc_calls_total", method="echo", outcome="ok", role="client") == 3
    assert value(text, "fleet_amqp_reconnects_total") == 0
