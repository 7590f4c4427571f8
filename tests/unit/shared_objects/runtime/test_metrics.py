"""Service metrics and the /metrics, /healthz, /readyz endpoint, over real loopback HTTP."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared_objects.runtime.config import ServiceConfig
from shared_objects.runtime.metrics import MetricsServer, ServiceMetrics
from shared_objects.version import VERSION


class MessagingTimeout(Exception):
    """Stands in for shared_objects.runtime.messaging.MessagingTimeout (matched by name)."""


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_track_rpc_counts_outcomes_latency_and_in_flight() -> None:
    m = ServiceMetrics("conductor", host="c1")
    with m.track_rpc("build", "server"):
        assert value(m.render(), "fleet_rpc_in_flight", role="server") == 1
    with pytest.raises(MessagingTimeout), m.track_rpc("build", "client"):
        raise MessagingTimeout()
    with pytest.raises(ValueError), m.track_rpc("build", "server"):
        raise ValueError("bad")
    with m.track_rpc("build", "server") as tracker:
        tracker.outcome = "error"
    text = m.render()
    assert value(text, "fleet_rpc_calls_total", method="build", outcome="ok", role="server") == 1
    assert value(text, "fleet_rpc_calls_total", method="build", outcome="error", role="server") == 2
    assert (
        value(text, "fleet_rpc_calls_total", method="build", outcome="timeout", role="client") == 1
    )
    assert value(text, "fleet_rpc_latency_seconds_count", method="build", role="server") == 3
    assert value(text, "fleet_rpc_in_flight", role="server") == 0
    assert value(text, "fleet_service_info", service="conductor", host="c1", version=VERSION) == 1


async def test_cancelled_call_is_counted_as_cancelled() -> None:
    m = ServiceMetrics("agent")

    async def slow() -> None:
        with m.track_rpc("live_migration", "server"):
            await asyncio.sleep(10)

    task = asyncio.create_task(slow())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    text = m.render()
    labels = {"method": "live_migration", "outcome": "cancelled", "role": "server"}
    assert value(text, "fleet_rpc_calls_total", **labels) == 1


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="role"), ServiceMetrics("x").track_rpc("m", "peer"):
        pass


def test_counters_reconnects_backports_and_instances() -> None:
    m = ServiceMetrics("conductor")
    m.amqp_reconnects.inc()
    m.object_backports.labels(object="Instance").inc(2)
    m.set_instances({"active": 3, "building": 1})
    m.set_instances({"active": 4})
    text = m.render()
    assert value(text, "fleet_amqp_reconnects_total") == 1
    assert value(text, "fleet_object_backports_total", object="Instance") == 2
    assert value(text, "fleet_instances", vm_state="active") == 4
    # A state that disappeared drops to 0 instead of keeping a stale count.
    assert value(text, "fleet_instances", vm_state="building") == 0


def test_each_service_has_its_own_registry() -> None:
    a, b = ServiceMetrics("a"), ServiceMetrics("b")
    a.amqp_reconnects.inc()
    assert value(a.render(), "fleet_amqp_reconnects_total") == 1
    assert value(b.render(), "fleet_amqp_reconnects_total") == 0


async def test_endpoint_serves_metrics_health_and_readiness() -> None:
    m = ServiceMetrics("compute-agent", host="h1")
    state = {"ready": False}
    with m.track_rpc("ping", "server"):
        pass
    async with MetricsServer(m, port=0, ready=lambda: state["ready"]) as server:
        assert server.port is not None
        assert server.url == f"http://127.0.0.1:{server.port}"
        status, headers, body = await http_get(server.port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert value(body, "fleet_rpc_calls_total", method="ping", outcome="ok", role="server") == 1
        assert value(body, "fleet_ready") == 0

        assert (await http_get(server.port, "/healthz"))[0] == 200
        assert (await http_get(server.port, "/readyz"))[0] == 503
        state["ready"] = True
        status, _, body = await http_get(server.port, "/readyz")
        assert (status, body) == (200, b"ready\n")

        assert (await http_get(server.port, "/nope"))[0] == 404
        assert (await http_get(server.port, "/metrics", method="POST"))[0] == 405
        status, headers, body = await http_get(server.port, "/healthz", method="HEAD")
        assert (status, body) == (200, b"")
        assert headers["Content-Length"] == "3"
        port = server.port
    assert server.port is None
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_endpoint_answers_garbage_with_400_and_keeps_serving() -> None:
    async with MetricsServer(ServiceMetrics("x"), port=0) as server:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"HELLO\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert (await http_get(server.port, "/healthz"))[0] == 200


async def test_failing_readiness_callback_gives_500_not_a_dead_endpoint() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    async with MetricsServer(ServiceMetrics("x"), port=0, ready=broken) as server:
        assert server.port is not None
        assert (await http_get(server.port, "/readyz"))[0] == 500
        assert (await http_get(server.port, "/healthz"))[0] == 200


async def test_from_config_port_zero_disables_the_endpoint() -> None:
    async with MetricsServer.from_config(ServiceConfig(), ServiceMetrics("x")) as server:
        assert server.port is None
        assert server.url is None


async def test_from_config_binds_the_configured_loopback_port() -> None:
    # Find a free port, then ask for exactly that one through the config.
    async with MetricsServer(ServiceMetrics("probe"), port=0) as probe:
        assert probe.port is not None
        free = probe.port
    cfg = ServiceConfig(metrics_host="127.0.0.1", metrics_port=free)
    async with MetricsServer.from_config(cfg, ServiceMetrics("x")) as server:
        assert server.port == free
        assert (await http_get(free, "/healthz"))[0] == 200


def test_metrics_carry_the_version_and_the_standard_collectors() -> None:
    text = ServiceMetrics("compute-agent", host="c1").render().decode()
    assert f'fleet_service_info{{host="c1",service="compute-agent",version="{VERSION}"}}' in text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert f"\n{name}" in text, name
    assert "python_gc_collections_total" in text
