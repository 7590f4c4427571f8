"""Prometheus metrics of one Fleet service, and the endpoint that serves them.

Each service object owns one ``ServiceMetrics`` (its own ``CollectorRegistry``, so several
services in one test process never share counters) and passes it to the parts that count:

    metrics = ServiceMetrics("conductor", host=cfg.host)
    # Pull: the messaging layer keeps plain counters; they are read at every scrape.
    metrics.watch_rpc("server", rpc_server.stats)          # calls, in-flight, dropped
    metrics.watch_rpc("client", rpc_client.stats)
    metrics.watch_transport(transport.stats)               # reconnects, publish failures
    observe = metrics.latency_observer("server")           # RPC layer calls observe(method, s)
    # Push: for calls no watched RPCServer/RPCClient counts (never both for the same calls).
    with metrics.track_rpc("build_instances", role="client"):
        await cctx.call(...)                               # outcome ok/error/timeout/cancelled
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
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.exposition import generate_latest

from shared_objects.runtime.http import HTTPEndpoint, Response
from shared_objects.runtime.log import get_logger
from shared_objects.version import VERSION

if TYPE_CHECKING:
    from shared_objects.runtime.config import ServiceConfig

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
        version: str = VERSION,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        reg = self.registry
        # The standard ones every Prometheus client exports (process_*, python_info,
        # python_gc_*): a registry of our own has none unless told. They read the process, so
        # several services in one test process show the same values, which is harmless.
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            reg.register(standard)
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
        self.rpc_dropped = Counter(
            "fleet_rpc_dropped",
            "Incoming RPC messages dropped unanswered (malformed, duplicate, ...), by reason.",
            ["reason", "role"],
            registry=reg,
        )
        self.amqp_publish_failures = Counter(
            "fleet_amqp_publish_failures",
            "Messages the broker refused or that could not be published.",
            registry=reg,
        )
        for role in ROLES:
            # Export the in-flight gauges at 0 from the start, not only after the first call.
            self.rpc_in_flight.labels(role=role)
        self._vm_states: set[str] = set()
        # Calls in flight counted by track_rpc (push), added to the pulled sources' counts.
        self._tracked_in_flight = dict.fromkeys(ROLES, 0)
        self._rpc_sources: list[_CounterSource] = []
        self._transport_sources: list[_CounterSource] = []

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
        self._tracked_in_flight[role] += 1
        in_flight.inc()
        start = time.perf_counter()
        try:
            yield tracker
        except BaseException as exc:
            tracker.outcome = tracker.outcome or classify_exception(exc)
            raise
        finally:
            elapsed = time.perf_counter() - start
            self._tracked_in_flight[role] -= 1
            in_flight.dec()
            self.record_rpc(method, role, tracker.outcome or OUTCOME_OK, elapsed)

    def record_rpc(self, method: str, role: str, outcome: str, seconds: float) -> None:
        """Count one finished RPC whose timing the caller measured itself."""
        self.rpc_calls.labels(method=method, outcome=outcome, role=role).inc()
        self.rpc_latency.labels(method=method, role=role).observe(seconds)

    def latency_observer(self, role: str) -> Callable[[str, float], None]:
        """``observe(method, seconds)`` for the latency histogram only (counts come by pull).

        For an RPC layer whose call counts are read with ``watch_rpc``: recording the latency
        through ``record_rpc`` as well would count every call twice.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")

        def observe(method: str, seconds: float) -> None:
            self.rpc_latency.labels(method=method, role=role).observe(seconds)

        return observe

    def watch_rpc(self, role: str, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Read an RPC server's or client's ``stats()`` at every scrape.

        ``stats()`` returns ``{"calls": {"method:outcome": n}, "in_flight": n,
        "dropped": {reason: n}}`` (``shared_objects.runtime.messaging`` RPCServer/RPCClient); the
        increase since the last scrape is added to ``fleet_rpc_calls_total`` and
        ``fleet_rpc_dropped_total``, and ``in_flight`` to ``fleet_rpc_in_flight``.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self._rpc_sources.append(_CounterSource(role, stats))

    def watch_transport(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Read a transport's ``stats()`` (``reconnects``, ``publish_failures``) at every scrape."""
        self._transport_sources.append(_CounterSource("", stats))

    def collect(self) -> None:
        """Bring the pulled counters up to date (``render`` does it before every scrape)."""
        pulled_in_flight = dict.fromkeys(ROLES, 0)
        for source in self._rpc_sources:
            snapshot = source.read()
            if snapshot is None:
                continue
            for key, n in _mapping(snapshot.get("calls")).items():
                method, _, outcome = str(key).rpartition(":")
                delta = source.delta(("calls", key), n)
                if delta:
                    self.rpc_calls.labels(method=method, outcome=outcome, role=source.role).inc(
                        delta
                    )
            for reason, n in _mapping(snapshot.get("dropped")).items():
                delta = source.delta(("dropped", reason), n)
                if delta:
                    self.rpc_dropped.labels(reason=str(reason), role=source.role).inc(delta)
            in_flight = snapshot.get("in_flight", 0)
            if isinstance(in_flight, int):
                pulled_in_flight[source.role] += in_flight
        if self._rpc_sources:
            for role in ROLES:
                total = self._tracked_in_flight[role] + pulled_in_flight[role]
                self.rpc_in_flight.labels(role=role).set(total)
        for source in self._transport_sources:
            snapshot = source.read()
            if snapshot is None:
                continue
            # A client's stats() nests its transport's; accept either shape.
            counters = _mapping(snapshot.get("transport")) or snapshot
            delta = source.delta(("reconnects",), counters.get("reconnects", 0))
            if delta:
                self.amqp_reconnects.inc(delta)
            delta = source.delta(("publish_failures",), counters.get("publish_failures", 0))
            if delta:
                self.amqp_publish_failures.inc(delta)

    def set_instances(self, counts: Mapping[str, int]) -> None:
        """Replace the per-vm_state instance counts; states absent from ``counts`` drop to 0."""
        for state in self._vm_states - counts.keys():
            self.instances.labels(vm_state=state).set(0)
        for state, count in counts.items():
            self.instances.labels(vm_state=state).set(count)
        self._vm_states |= counts.keys()

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format (pulled counters refreshed)."""
        self.collect()
        return generate_latest(self.registry)


def _mapping(value: object) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else {}


class _CounterSource:
    """A ``stats()`` callable and the values it returned last time, to turn totals into deltas."""

    def __init__(self, role: str, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.role = role
        self._stats = stats
        self._last: dict[tuple[Any, ...], float] = {}

    def read(self) -> Mapping[str, Any] | None:
        try:
            return self._stats()
        except Exception:
            # A broken source must not break the scrape of everything else.
            log.exception("metrics source failed", role=self.role)
            return None

    def delta(self, key: tuple[Any, ...], total: object) -> float:
        """How much ``total`` grew since the last read; a total that went down was reset."""
        if not isinstance(total, (int, float)) or isinstance(total, bool):
            return 0
        last = self._last.get(key, 0)
        self._last[key] = total
        return total - last if total >= last else total


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
