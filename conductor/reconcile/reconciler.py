"""The reconciler's loop: a pass every ``reconcile_interval`` seconds, on every conductor.

A pass is level-triggered (as a Kubernetes controller): it reads the current state, decides
(``rules.plan``) and drives each stranded row one step towards a final state. It keeps no memory
between passes (the database holds everything it needs, including whether a build was re-cast),
so a pass can be repeated, interrupted, or run by several conductors at once: every change is a
compare-and-swap that only one of them wins.

Cost of a pass: four reads (services, transitional instances, stale migrations, open actions),
plus one read of the attempts of the builds to place again; each read is bounded by
``reconcile_batch`` rows. Then a fixed number of batched writes in one unit of work, and one
placement (a few statements and a cast) per build to move.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import time

import structlog
from prometheus_client import CollectorRegistry, Counter

from conductor.db.session import Database
from conductor.reconcile import actions, rules, statements
from conductor.reconcile.rules import Bounds, Plan, Snapshot
from conductor.tasks.build import BuildTask
from shared_objects.context import admin_context
from shared_objects.releases import BINARY_CONDUCTOR
from shared_objects.runtime.config import ConductorConfig

log = structlog.get_logger(__name__)


def bounds_from_config(cfg: ConductorConfig, service_down_time: float) -> Bounds:
    """The rules' bounds from ``[conductor]`` and ``[service] service_down_time``."""
    return Bounds(
        service_down_time=service_down_time,
        build_recast_after=cfg.build_recast_after,
        build_reschedule_after=cfg.build_reschedule_after,
        unassigned_build_after=cfg.unassigned_build_after,
        build_host_down_after=cfg.build_host_down_after,
        delete_recast_after=cfg.delete_recast_after,
        delete_host_down_after=cfg.delete_host_down_after,
        migration_hosts_down_after=cfg.migration_hosts_down_after,
        action_settle_after=cfg.action_settle_after,
    )


@dataclasses.dataclass(slots=True)
class PassReport:
    """What one pass saw and did (tests, benchmarks, the debug log)."""

    rows_read: int = 0
    acted: int = 0
    seconds: float = 0.0
    statements: int = 0


class Reconciler:
    """Runs passes in a task of its own between ``start`` and ``stop``."""

    def __init__(
        self,
        database: Database,
        build: BuildTask,
        bounds: Bounds,
        *,
        interval: float,
        batch: int = 500,
        registry: CollectorRegistry | None = None,
        trust_after: float | None = None,
    ) -> None:
        """``trust_after``: seconds this reconciler must have been reading the database
        without failure before it takes a host's stale report for a dead host (default
        ``service_down_time``: time enough for every live agent to have reported)."""
        self.database = database
        self.build = build
        self.bounds = bounds
        self.interval = interval
        self.batch = batch
        self._task: asyncio.Task[None] | None = None
        self.trust_after = bounds.service_down_time if trust_after is None else trust_after
        # Since when passes have been reading the database without failure (monotonic).
        self._working_since: float | None = None
        self.actions = Counter(
            "fleet_reconciler_actions",
            "Changes made by the conductor's reconciler, by rule.",
            ["rule"],
            registry=registry,
        )
        self.passes = Counter(
            "fleet_reconciler_passes",
            "Reconciler passes run by this conductor, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for rule in rules.RULES:
            self.actions.labels(rule=rule)  # exported at 0 from the start

    def count(self, rule: str) -> None:
        self.actions.labels(rule=rule).inc()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start passing every ``interval`` seconds (nothing when it is 0)."""
        if self.interval <= 0 or self._task is not None:
            return
        self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop(self) -> None:
        """Stop after (or in the middle of) the current pass: each of its steps is a
        compare-and-swap in its own unit of work, so an interrupted pass leaves nothing half
        done; the next pass (of any conductor) picks up the rest."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_pass()
                self.passes.labels(outcome="ok").inc()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A database or broker outage: the next pass retries from the state it reads,
                # and trusts "down" only once agents have had the time to report again.
                self._working_since = None
                self.passes.labels(outcome="error").inc()
                log.warning("reconcile_pass_failed", exc_info=True)

    # --- one pass ---------------------------------------------------------------------------

    async def read(self, now: datetime.datetime) -> tuple[Snapshot, int]:
        """The rows of one pass, and the statements it took."""
        b = self.bounds
        ctxt = admin_context(BINARY_CONDUCTOR)
        async with self.database.request(ctxt):
            db = ctxt.db
            services = await statements.compute_services(db)
            instances = await statements.transitional_instances(
                db, older_than=now - _seconds(min(b.youngest, 1.0)), limit=self.batch
            )
            migrations = await statements.stale_migrations(
                db,
                statuses=rules.WATCHED_MIGRATION_STATUSES,
                older_than=now - _seconds(b.migration_hosts_down_after),
                limit=self.batch,
            )
            open_actions = await statements.open_actions(
                db, older_than=now - _seconds(b.action_settle_after), limit=self.batch
            )
            used = int(getattr(db, "statements", 0))
        return Snapshot(now, services, instances, migrations, open_actions), used

    async def run_pass(self) -> PassReport:
        """Read, decide, act; one pass."""
        started = time.perf_counter()
        now = datetime.datetime.now(datetime.UTC)
        snapshot, used = await self.read(now)
        clock = time.monotonic()
        if self._working_since is None:
            self._working_since = clock
        trust_down = clock - self._working_since >= self.trust_after
        plan = rules.plan(snapshot, self.bounds, trust_down=trust_down)
        if plan.held:
            log.warning("reconcile_held", reason=plan.held)
        report = PassReport(
            rows_read=len(snapshot.instances) + len(snapshot.migrations) + len(snapshot.actions),
            statements=used,
        )
        if not plan.empty:
            report.acted, more = await self._act(plan, now)
            report.statements += more
        report.seconds = time.perf_counter() - started
        log.debug("reconcile_pass", **dataclasses.asdict(report))
        return report

    async def _act(self, plan: Plan, now: datetime.datetime) -> tuple[int, int]:
        acted = 0

        def count(rule: str) -> None:
            nonlocal acted
            acted += 1
            self.count(rule)

        ctxt = admin_context(BINARY_CONDUCTOR)
        attempts: dict[str, list[str]] = {}
        async with self.database.request(ctxt):
            db = ctxt.db
            await actions.apply_batches(ctxt, plan, self.bounds, now, count)
            if plan.moves:
                for row in await statements.build_attempts(db, [m.uuid for m in plan.moves]):
                    attempts.setdefault(row["instance_uuid"], []).append(row["host"])
            used = int(getattr(db, "statements", 0))
        for move in plan.moves:
            try:
                await actions.apply_move(
                    self.build, move, attempts.get(move.uuid, []), self.bounds, count
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                # One build's failure (e.g. a cast refused) must not stop the others.
                log.warning(
                    "reconcile_move_failed", instance_uuid=move.uuid, rule=move.rule, exc_info=True
                )
        return acted, used


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
