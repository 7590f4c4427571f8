"""Cheap liveness: agents' beats coalesced into one UPDATE per flush.

Before release 1.2 every agent beat with ``Service.heartbeat()``: a full object round trip (the
Service object both ways, the policy's ownership scope, an audit line) and one UPDATE, per host
per report interval. ``report_alive`` (conductor RPC 1.1, namespace None) carries nothing: the
host is the caller's broker-validated login, so a host can only ever mark itself alive. Beats
that arrive within ``max_delay`` of each other (or ``max_batch`` of them) share one statement::

    UPDATE services SET last_seen_up = now, report_count = report_count + 1
     WHERE binary = 'fleet-compute' AND host = ANY(:hosts) AND NOT deleted
    RETURNING host, disabled, forced_down,
              EXISTS (SELECT 1 FROM migrations WHERE source_compute = services.host
                       AND status IN ('accepted', 'queued') AND migration_type = 'live-migration'
                       AND NOT deleted)

The last column tells the agent whether a live migration from it is waiting to start: only then
does its orphan sweep need to read its migrations (``compute_agent/live_migration.py``). Before,
every agent read them every minute, one object call per host per 60 s that found nothing almost
always (a sixth of all conductor calls at 1,000 hosts); the flag costs an index probe
(``migrations (source_compute, status)``) inside the statement the beat runs anyway.

Every caller is answered only after its batch committed, so an acknowledged beat is a written
beat, and a database outage still reaches the agent as a failed beat (``DatabaseUnavailable``).
A host whose row is missing or deleted gets ``ServiceNotFound``, as ``Service.heartbeat`` gave.
Two beats of one host in one batch count once in ``report_count`` (both are answered, from one
shared future). While a beat waits for its batch, its handler gives back its concurrency slot
(``release_handler_slot``): beats wait up to ``max_delay``, and at 1,000 hosts they would
otherwise fill a conductor's slots and queue every other request behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import (
    ARRAY,
    and_,
    any_,
    bindparam,
    exists,
    false,
    literal_column,
    select,
    update,
)

from conductor.db.errors import database_unavailable_boundary
from conductor.db.session import Database
from conductor.db.where import table_for
from shared_objects import exception, releases
from shared_objects.context import RequestContext, admin_context
from shared_objects.fields import MigrationStatus, MigrationType
from shared_objects.objects._common import utcnow
from shared_objects.rpc_clients.conductor import REPORT_ALIVE_VERSION
from shared_objects.runtime import audit
from shared_objects.runtime.authorizer import forbidden
from shared_objects.runtime.identity import Caller
from shared_objects.runtime.messaging import ExpectedException, Target, expose, release_handler_slot

log = structlog.get_logger(__name__)

_services = table_for("services")
_migrations = table_for("migrations")


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceState:
    """What a beat tells its agent about its row (shown by the agent when it changes)."""

    disabled: bool
    forced_down: bool
    #: A live migration with this host as its source is accepted or queued (not started).
    live_migrations_waiting: bool = False

    def as_reply(self) -> dict[str, bool]:
        return {
            "disabled": self.disabled,
            "forced_down": self.forced_down,
            "live_migrations_waiting": self.live_migrations_waiting,
        }


def _constant(value: str) -> Any:
    # Inline SQL literals: the statement runner binds only the batch's own parameters (w_*,
    # v_*), so constants may not become bind parameters. These are enum values, never input.
    assert value.replace("-", "").isalnum()
    return literal_column(f"'{value}'")


def _waiting_live_migrations() -> Any:
    """Whether the beating host is the source of a live migration not started yet."""
    return exists(
        select(1)
        .select_from(_migrations)
        .where(
            and_(
                _migrations.c.source_compute == _services.c.host,
                _migrations.c.status.in_(
                    [_constant(MigrationStatus.ACCEPTED), _constant(MigrationStatus.QUEUED)]
                ),
                _migrations.c.migration_type == _constant(MigrationType.LIVE_MIGRATION),
                _migrations.c.deleted == false(),
            )
        )
    ).label("live_migrations_waiting")


def _build(arrays: bool) -> Any:
    hosts = (
        _services.c.host == any_(bindparam("w_hosts", type_=ARRAY(_services.c.host.type)))
        if arrays
        else _services.c.host.in_(bindparam("w_hosts", expanding=True))
    )
    return (
        update(_services)
        .where(
            and_(
                _services.c.binary == bindparam("w_binary"),
                hosts,
                _services.c.deleted == false(),
            )
        )
        .values(
            last_seen_up=bindparam("v_now", type_=_services.c.last_seen_up.type),
            report_count=_services.c.report_count + 1,
        )
        .returning(
            _services.c.host,
            _services.c.disabled,
            _services.c.forced_down,
            _waiting_live_migrations(),
        )
    )


class LivenessBatcher:
    """Pending beats by host; one statement per flush, each caller answered after its commit.

    A flush starts ``max_delay`` seconds after the first beat of a batch, or at once when
    ``max_batch`` hosts are pending. Flushes run one at a time: beats arriving during a flush
    form the next batch (backpressure: a slow database means larger batches, not more
    statements).
    """

    def __init__(
        self,
        database: Database,
        *,
        max_delay: float = 0.5,
        max_batch: int = 1000,
        clock: Callable[[], Any] = utcnow,
    ) -> None:
        self._database = database
        self.max_delay = max_delay
        self.max_batch = max_batch
        self._clock = clock
        # One future per host per batch: a host's repeated beats share it, so what is pending
        # is bounded by the number of hosts, however fast one of them beats.
        self._pending: dict[str, asyncio.Future[ServiceState]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.flushes = 0
        self.beats = 0
        self._beats_metric: Counter | None = None
        self._flushes_metric: Counter | None = None

    def export_metrics(self, registry: CollectorRegistry) -> None:
        """``fleet_liveness_beats_total`` and ``fleet_liveness_flushes_total`` (one UPDATE
        each): their ratio is how many beats one statement carries."""
        self._beats_metric = Counter(
            "fleet_liveness_beats", "Agents' report_alive beats received.", registry=registry
        )
        self._flushes_metric = Counter(
            "fleet_liveness_flushes",
            "Batched liveness UPDATEs committed (each marks every host that beat meanwhile).",
            registry=registry,
        )

    async def beat(self, host: str) -> ServiceState:
        """Mark ``host`` alive in the next batch; returns once that batch committed."""
        loop = asyncio.get_running_loop()
        future = self._pending.get(host)
        if future is None:
            future = self._pending[host] = loop.create_future()
        self.beats += 1
        if self._beats_metric is not None:
            self._beats_metric.inc()
        if len(self._pending) >= self.max_batch:
            self._flush_soon()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay, self._flush_soon)
        return await asyncio.shield(future)

    def _flush_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        task = asyncio.get_running_loop().create_task(self._flush(batch), name="liveness-flush")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: dict[str, asyncio.Future[ServiceState]]) -> None:
        try:
            async with self._lock:
                found = await self._write(sorted(batch))
        except asyncio.CancelledError:
            # The conductor is stopping mid-write: the callers' beats may not have landed.
            _fail(batch, exception.DatabaseUnavailable(reason="conductor stopping"))
            raise
        except exception.FleetException as exc:
            # DatabaseUnavailable (logged once by the boundary): every caller's beat failed.
            _fail(batch, exc)
            return
        except Exception as exc:
            log.exception("liveness_flush_failed", hosts=len(batch))
            _fail(batch, exc)
            return
        self.flushes += 1
        if self._flushes_metric is not None:
            self._flushes_metric.inc()
        for host, future in batch.items():
            state = found.get(host)
            if future.done():
                continue
            if state is None:
                future.set_exception(
                    exception.ServiceNotFound(service_id=f"{releases.BINARY_COMPUTE}@{host}")
                )
            else:
                future.set_result(state)

    async def _write(self, hosts: list[str]) -> dict[str, ServiceState]:
        ctxt = admin_context(releases.BINARY_CONDUCTOR)
        params = {"w_hosts": hosts, "w_binary": releases.BINARY_COMPUTE, "v_now": self._clock()}
        async with (
            database_unavailable_boundary("report_alive", None),
            self._database.request(ctxt) as db,
        ):
            rows = await db.run_statement(
                ("liveness", "report_alive"), "services", _build, params, rows=True, write=True
            )
        return {
            row["host"]: ServiceState(
                bool(row["disabled"]),
                bool(row["forced_down"]),
                bool(row["live_migrations_waiting"]),
            )
            for row in rows
        }

    async def stop(self) -> None:
        """Write what is pending now (its callers are answered), then wait for the flushes."""
        self._flush_soon()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _fail(batch: dict[str, asyncio.Future[ServiceState]], exc: BaseException) -> None:
    for future in batch.values():
        if not future.done():
            future.set_exception(exc)


def beating_host(caller: Any) -> str:
    """The one host a beat may mark alive: the caller's own, from its broker login.

    Refused (``Forbidden``, audited): anyone but an agent, and a login that speaks for several
    hosts (the legacy shared login of releases before 1.2, whose agents beat with
    ``Service.heartbeat`` anyway) since it cannot say which one is alive.
    """
    action = "report_alive"
    if not isinstance(caller, Caller) or not caller.is_agent or len(caller.hosts) != 1:
        reason = "only an agent on its own host login may report itself alive"
        audit.refused(caller if isinstance(caller, Caller) else None, action, None, reason)
        raise forbidden(caller if isinstance(caller, Caller) else None, action, "services")
    (host,) = caller.hosts
    return host


class LivenessEndpoint:
    """``report_alive`` on topic ``conductor`` (namespace None, API 1.1)."""

    target = Target(version=REPORT_ALIVE_VERSION)

    def __init__(self, batcher: LivenessBatcher) -> None:
        self.batcher = batcher

    @expose
    async def report_alive(self, ctxt: RequestContext) -> dict[str, bool]:
        """Mark the caller's host alive (conductor's clock); its row's disabled/forced_down,
        and whether a live migration from it waits to start (``live_migrations_waiting``).

        Accepted beats are not audited: one line per host per interval would bury the audit
        trail and cost more than the beat. Refusals are.
        """
        try:
            host = beating_host(ctxt.principal)
            # The wait is for the batch's UPDATE, which the batcher's own task runs: this
            # handler holds nothing meanwhile and must not keep others out (up to max_delay).
            release_handler_slot()
            state = await self.batcher.beat(host)
        except exception.FleetException as exc:
            raise ExpectedException(exc) from exc
        return state.as_reply()
