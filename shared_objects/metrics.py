"""Prometheus metrics of one Fleet service, and the endpoint that serves them.

Each service object owns one ``ServiceMetrics`` (its own ``CollectorRegistry``, so several
services in one test process never share counters) and passes it to the parts that count:

    metrics = ServiceMetrics("conductor", host=cfg.host)
    with metrics.track_rpc("build_instances", role="server"):
        await handler(...)                                 # outcome ok / error / timeout
    metrics.amqp_reconnects.inc()                          # on every broker reconnect
    metrics.object_backports.labels(object="Instance").inc()
    metrics.set_instances({"active": 10, "building": 2})   # conductor, periodically

    async with MetricsServer.from_config(cfg.service, metrics, ready=lambda: service.ready):
        ...  # GET /metrics, /healthz, /readyz on cfg.service.metrics_host:metrics_port

Metric names (all prefixed ``fleet_``) are part of the operations contract; see
``docs/operations.md`` before renaming one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from shared_objects.http import HTTPEndpoint, Response
from shared_objects.log import get_logger

if TYPE_CHECKING:
    from shared_objects.config import ServiceConfig

__all__ = [
    "OUTCOME_CANCELLED",
    "OUTCOME_ERROR",
    "OUTCOME_OK",
    "OUTCOME_TIMEOUT",
    "MetricsServer",
    "ServiceMetrics",
]

log = get_logger(__name__)

# The classic text format every Prometheus version parses; generate_latest writes exactly this.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_CANCELLED = "cancelled"
ROLES = ("server", "client")
# Loopback RPC takes well under a millisecond; a live migration call can take a minute.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def classify_exception(exc: BaseException) -> str:
    """The ``outcome`` label for a call that raised ``exc``: timeout, cancelled or error.

    Duck-typed on the class name so this module needs no import of the messaging layer
    (``MessagingTimeout`` counts as a timeout, as does the builtin ``TimeoutError``).
    """
    if isinstance(exc, TimeoutError) or type(exc).__name__.endswith("Timeout"):
        return OUTCOME_TIMEOUT
    if isinstance(exc, asyncio.CancelledError):
        return OUTCOME_CANCELLED
    return OUTCOME_ERROR


class RPCTracker:
    """What ``ServiceMetrics.track_rpc`` yields: lets the caller override the outcome."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: str | None = None


class ServiceMetrics:
    """The metrics of one service, in a registry of its own."""

    def __init__(
        self,
        service: str,
        host: str = "",
        version: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        reg = self.registry
        self.service = service
        self.info = Gauge(
            "fleet_service_info",
            "Constant 1, labelled with what this process is.",
            ["service", "host", "version"],
            registry=reg,
        )
        self.info.labels(service=service, host=host, version=version).set(1)
        self.ready = Gauge(
            "fleet_ready", "1 when the service reports ready (as /readyz), else 0.", registry=reg
        )
        self.rpc_calls = Counter(
            "fleet_rpc_calls",
            "RPC calls handled (role=server) or made (role=client), by method and outcome.",
            ["method", "outcome", "role"],
            registry=reg,
        )
        self.rpc_latency = Histogram(
            "fleet_rpc_latency_seconds",
            "RPC latency: handler time (role=server) or round trip (role=client).",
            ["method", "role"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.rpc_in_flight = Gauge(
            "fleet_rpc_in_flight",
            "RPC requests being handled (role=server) or awaiting a reply (role=client).",
            ["role"],
            registry=reg,
        )
        self.amqp_reconnects = Counter(
            "fleet_amqp_reconnects", "Times the broker connection was re-established.", registry=reg
        )
        self.object_backports = Counter(
            "fleet_object_backports",
            "Objects received too new and backported through the conductor, by object name.",
            ["object"],
            registry=reg,
        )
        self.instances = Gauge(
            "fleet_instances",
            "Instances known to the conductor, by vm_state (set by the conductor only).",
            ["vm_state"],
            registry=reg,
        )
        for role in ROLES:
            # Export the in-flight gauges at 0 from the start, not only after the first call.
            self.rpc_in_flight.labels(role=role)
        self._vm_states: set[str] = set()

    @contextlib.contextmanager
    def track_rpc(self, method: str, role: str) -> Iterator[RPCTracker]:
        """Count one RPC: in-flight while inside, then latency and ``outcome``.

        The outcome is ``ok`` when the block ends normally, ``timeout``/``error`` when it raises
        (see ``classify_exception``); set ``tracker.outcome`` to override (e.g. a handler that
        returned an error reply without raising).
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        tracker = RPCTracker()
        in_flight = self.rpc_in_flight.labels(role=role)
        in_flight.inc()
        start = time.perf_counter()
        try:
            yield tracker
        except BaseException as exc:
            tracker.outcome = tracker.outcome or classify_exception(exc)
            raise
        finally:
            elapsed = time.perf_counter() - start
            in_flight.dec()
            self.record_rpc(method, role, tracker.outcome or OUTCOME_OK, elapsed)

    def record_rpc(self, method: str, role: str, outcome: str, seconds: float) -> None:
        """Count one finished RPC whose timing the caller measured itself."""
        self.rpc_calls.labels(method=method, outcome=outcome, role=role).inc()
        self.rpc_latency.labels(method=method, role=role).observe(seconds)

    def set_instances(self, counts: Mapping[str, int]) -> None:
        """Replace the per-vm_state instance counts; states absent from ``counts`` drop to 0."""
        for state in self._vm_states - counts.keys():
            self.instances.labels(vm_state=state).set(0)
        for state, count in counts.items():
            self.instances.labels(vm_state=state).set(count)
        self._vm_states |= counts.keys()

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` for one service, as an async context manager.

    - ``/healthz``: 200 whenever the event loop answers (liveness);
    - ``/readyz``: 200 when ``ready()`` is true (consumers up, broker connected), else 503;
    - ``/metrics``: the service's registry.

    Disabled (a no-op context manager, ``port`` is None) when ``enabled`` is false, which is
    what ``from_config`` does for ``metrics_port = 0``.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        host: str = "127.0.0.1",
        port: int = 0,
        ready: Callable[[], bool] = lambda: True,
        enabled: bool = True,
    ) -> None:
        self.metrics = metrics
        self._ready = ready
        self._host = host
        self._enabled = enabled
        routes = {"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz}
        self._endpoint = HTTPEndpoint(routes, host=host, port=port)
        self._running = False

    @classmethod
    def from_config(
        cls,
        service_cfg: ServiceConfig,
        metrics: ServiceMetrics,
        ready: Callable[[], bool] = lambda: True,
    ) -> MetricsServer:
        """A server on ``[service] metrics_host:metrics_port``; disabled when the port is 0."""
        return cls(
            metrics,
            host=service_cfg.metrics_host,
            port=service_cfg.metrics_port,
            ready=ready,
            enabled=service_cfg.metrics_port != 0,
        )

    @property
    def port(self) -> int | None:
        """The bound port, or None when disabled or not started."""
        return self._endpoint.port if self._running else None

    @property
    def url(self) -> str | None:
        """Base URL such as ``http://127.0.0.1:9464``, or None when not serving."""
        return self._endpoint.url if self._running else None

    async def start(self) -> None:
        """Start serving (no-op when disabled)."""
        if not self._enabled or self._running:
            return
        await self._endpoint.start()
        self._running = True
        log.info("metrics endpoint listening", url=self._endpoint.url)

    async def stop(self) -> None:
        """Stop serving."""
        if self._running:
            self._running = False
            await self._endpoint.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _is_ready(self) -> bool:
        ready = bool(self._ready())
        self.metrics.ready.set(1 if ready else 0)
        return ready

    def _metrics(self) -> Response:
        self._is_ready()
        return Response(200, self.metrics.render(), CONTENT_TYPE)

    def _healthz(self) -> Response:
        return Response(200, b"ok\n")

    def _readyz(self) -> Response:
        if self._is_ready():
            return Response(200, b"ready\n")
        return Response(503, b"not ready\n")
