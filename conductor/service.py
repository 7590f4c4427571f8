"""The conductor service: serves object indirection on topic ``conductor`` and reports its own
liveness in the services table.

Conductors are stateless; run as many as you like on the same topic. Each one refuses to start
unless the database schema is at this release's head (``fleetctl db upgrade`` migrates).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog

from conductor.census import Census
from conductor.db import migration
from conductor.db.connect_errors import DATABASE_CONNECT_ERRORS, describe_database_failure
from conductor.db.session import Database
from conductor.host_view import HostView, HostViewSettings
from conductor.indirection import BaseAPIEndpoint, ConductorIndirectionEndpoint
from conductor.liveness import LivenessBatcher, LivenessEndpoint
from conductor.reconcile import Reconciler, bounds_from_config
from conductor.tasks.build_placement import BuildSettings
from conductor.tasks.endpoint import ComputeTaskEndpoint
from conductor.tasks.live_migration import LiveMigrationTaskSettings
from shared_objects import exception, releases
from shared_objects.context import admin_context
from shared_objects.objects.service import ServiceReporter
from shared_objects.policy import CONDUCTOR_RPC_POLICY
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.rpc_clients.conductor import TOPIC as CONDUCTOR_TOPIC
from shared_objects.runtime.authorizer import RoleAuthorizer, reply_checks
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.identity import Identities, Role
from shared_objects.runtime.messaging import (
    BrokerConnectFailed,
    RPCServer,
    Target,
    Transport,
    get_transport,
)
from shared_objects.runtime.metrics import ServiceMetrics
from shared_objects.runtime.startup_retry import retry_at_start
from shared_objects.runtime.url_secrets import mask_url
from shared_objects.serializer import FleetObjectSerializer
from shared_objects.startup_checks import check_computes_supported
from shared_objects.upgrade_levels import ComputeUpgradeLevels

log = structlog.get_logger(__name__)

# A stop marks the service down within this many seconds, or leaves it to go down by silence.
_MARK_DOWN_TIMEOUT = 5.0

_MARK_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    exception.FleetException,
    *DATABASE_CONNECT_ERRORS,
)


class ConductorService:
    """One conductor process: database, RPC server, heartbeat."""

    def __init__(
        self,
        cfg: FleetConfig,
        *,
        extra_endpoints: list[Any] | None = None,
        extra_policy: Mapping[tuple[str | None, str], frozenset[Role]] | None = None,
        transport: Transport | None = None,
        topic: str = CONDUCTOR_TOPIC,
    ) -> None:
        self.cfg = cfg
        # RabbitMQ queues are named by topic alone (oslo's layout), so two deployments (or two
        # tests) on one vhost share the "conductor" queue even with different exchanges: give
        # each its own topic to isolate them.
        self.topic = topic
        self.database = Database(cfg.database.url)
        self._own_transport = transport is None
        self.transport = (
            transport
            if transport is not None
            else get_transport(cfg.messaging, allowed_remote_exmods=exception.ALLOWED_REMOTE_EXMODS)
        )
        self.serializer = FleetObjectSerializer()
        self.identities = Identities(cfg.security)
        self.endpoint = ConductorIndirectionEndpoint(self.database, self.identities)
        # Calls to agents: objects go at the receiver's versions (see shared_objects.releases).
        self.levels = ComputeUpgradeLevels(
            cfg.upgrade_levels.compute,
            self._db_context,
            service_down_time=cfg.service.service_down_time,
            refresh_interval=cfg.upgrade_levels.refresh_interval,
        )
        self.compute = ComputeAPI(
            self.transport,
            FleetObjectSerializer(),
            levels=self.levels,
            reply_from=reply_checks(self.identities),
        )
        self.tasks = ComputeTaskEndpoint(
            self.database,
            self.compute,
            BuildSettings(service_down_time=cfg.service.service_down_time),
            LiveMigrationTaskSettings.from_config(
                cfg.live_migration, cfg.service.service_down_time
            ),
            host_view=HostView(
                HostViewSettings(
                    service_down_time=cfg.service.service_down_time,
                    refresh_interval=cfg.conductor.host_view_refresh_interval,
                    overlap=cfg.conductor.host_view_overlap,
                    full_refresh_interval=cfg.conductor.host_view_full_refresh_interval,
                )
            ),
        )
        # Agents' beats: one UPDATE per flush for every host that beat meanwhile.
        self.liveness = LivenessBatcher(self.database)
        self.server = RPCServer(
            self.transport,
            Target(topic=topic, server=cfg.host),
            endpoints=[
                self.endpoint,
                LivenessEndpoint(self.liveness),
                BaseAPIEndpoint(),
                self.tasks,
                *(extra_endpoints or []),
            ],
            serializer=self.serializer,
            authorizer=RoleAuthorizer(
                self.identities,
                {**CONDUCTOR_RPC_POLICY, **(extra_policy or {})},
                service="conductor",
            ),
            # Fleet's publishers always set user_id and RabbitMQ validates it: none means a
            # publisher that sidesteps identity, refused (docs/security.md).
            require_user_id=True,
        )
        self.metrics = ServiceMetrics("conductor", host=cfg.host)
        self.liveness.export_metrics(self.metrics.registry)
        self._census: asyncio.Task[None] | None = None
        self.census = Census(self.metrics, service_down_time=cfg.service.service_down_time)
        self.metrics.watch_rpc("server", self.server.stats)
        self.server.latency_observer = self.metrics.latency_observer("server")
        self.metrics.watch_transport(self.transport.stats)
        # Builds, deletes, migrations and actions nobody is responsible for any more are
        # finished or failed by every conductor (compare-and-swaps: no leader needed).
        self.reconciler = Reconciler(
            self.database,
            self.tasks.build,
            bounds_from_config(cfg.conductor, cfg.service.service_down_time),
            interval=cfg.conductor.reconcile_interval,
            batch=cfg.conductor.reconcile_batch,
            registry=self.metrics.registry,
        )
        # What start() built, unwound by stop() (or by start() itself when a step fails).
        self._running = contextlib.AsyncExitStack()
        self._started = False
        # From the first moment of stop(): /readyz answers 503 for the whole drain.
        self._stopping = False
        self.reporter = ServiceReporter(
            self._db_context,
            host=cfg.host,
            binary=releases.BINARY_CONDUCTOR,
            topic=topic,
            version=releases.SERVICE_VERSION,
            interval=cfg.service.report_interval,
        )

    @contextlib.asynccontextmanager
    async def _db_context(self) -> AsyncIterator[Any]:
        ctxt = admin_context(releases.BINARY_CONDUCTOR)
        async with self.database.request(ctxt):
            yield ctxt

    async def start(self) -> None:
        """Check the identity (``WrongIdentity``), wait for the database and check its schema
        (``SchemaNotAtHead``), wait for the broker, serve, register, start the periodic work.

        Each step's undo is pushed on an ``AsyncExitStack`` before the step runs: a step that
        fails unwinds everything the steps before it built (in reverse) and re-raises, so a
        failed start leaves no connection, task or database pool behind. The broker and the
        database are retried for ``[service] start_retry_timeout`` seconds; past it,
        ``StartupFailed`` (one line).
        """
        self._stopping = False
        stack = contextlib.AsyncExitStack()
        try:
            head = await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._running = stack
        self._started = True
        log.info("conductor_started", host=self.cfg.host, schema=head)

    async def _start(self, stack: contextlib.AsyncExitStack) -> str:
        # Needs no connection: a login of the wrong role is a configuration error (exit 2).
        self.check_identity()
        bound = self.cfg.service.start_retry_timeout
        url = self.cfg.database.url
        stack.push_async_callback(self.database.dispose)
        head = await retry_at_start(
            "database",
            lambda: migration.check_at_head(url),
            bound=bound,
            retry_on=DATABASE_CONNECT_ERRORS,
            describe=lambda exc: (
                f"cannot open the database {mask_url(url)}: {describe_database_failure(exc)}"
            ),
        )
        if self._own_transport:
            stack.push_async_callback(self.transport.close)
            await retry_at_start(
                "broker",
                self.transport.connect,
                bound=bound,
                retry_on=(BrokerConnectFailed,),
                describe=str,
            )
        async with self._db_context() as ctxt:
            await check_computes_supported(ctxt, self.cfg.service.service_down_time)
        # Unwound after the server stopped: beats it accepted are written (and answered).
        stack.push_async_callback(self.liveness.stop)
        stack.push_async_callback(self.server.stop, 0)
        await self.server.start()
        stack.push_async_callback(self._mark_down)
        stack.push_async_callback(self.reporter.stop)
        await self.reporter.start()
        stack.push_async_callback(self.levels.stop)
        await self.levels.start()
        stack.push_async_callback(self._stop_census)
        self._census = asyncio.create_task(self._count_instances(), name="instance-census")
        # Last: its first pass may cast to agents, which needs the levels read above.
        stack.push_async_callback(self.reconciler.stop)
        self.reconciler.start()
        return head

    def check_identity(self) -> None:
        """Refuse to run on a login that is not a conductor's: agents would refuse its calls
        and drop its replies, and it would be refused everything it asks of them."""
        login = self.transport.user_id
        if self.identities.resolve(login).role is not Role.CONDUCTOR:
            raise exception.WrongIdentity(
                service="conductor",
                login=login,
                expected=f"a conductor login ({', '.join(self.cfg.security.conductor_logins)})",
            )
        log.info("security_identities", login=login, **self.identities.describe())
        if self.cfg.security.legacy_shared_login:
            log.warning(
                "legacy_shared_login_enabled",
                login=self.cfg.security.legacy_shared_login,
                hosts=list(self.cfg.security.legacy_hosts),
                hint="agents on the shared login act for all of these hosts; remove once "
                "every listed host runs release 1.2 with its own login",
            )

    async def stop(self, grace: float | None = None) -> None:
        """Stop in the order both services share (``shared_objects.runtime.service_runner``):

        1. stop taking work: the RPC server stops consuming and lets in-flight requests finish
           for up to ``grace`` seconds;
        2. unwind what ``start`` built, in reverse: the reconciler (a pass cut short leaves
           nothing half done, each step being a compare-and-swap of its own), the instance
           census, the upgrade-level refresh, the heartbeat, then the service is marked down at
           once (``last_seen_up`` cleared), the agents' pending beats are written, the broker
           connection closes, and the database closes last (everything above may use it).
        """
        self._stopping = True
        await self.server.stop(grace=grace if grace is not None else self._grace())
        stack, self._running = self._running, contextlib.AsyncExitStack()
        await stack.aclose()
        self._started = False
        log.info("conductor_stopped", host=self.cfg.host)

    async def _stop_census(self) -> None:
        census, self._census = self._census, None
        if census is not None:
            census.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await census

    async def _mark_down(self) -> None:
        """Clear ``last_seen_up``: this conductor is down from now on, not ``service_down_time``
        after its last heartbeat. Bounded: a stop must not hang on a database outage (the
        service then goes down the usual way, by silence)."""
        service = self.reporter.service
        if service is None:
            return
        try:
            async with asyncio.timeout(_MARK_DOWN_TIMEOUT), self._db_context() as ctxt:
                service._context = ctxt
                service.last_seen_up = None
                await service.save()
        except _MARK_DOWN_ERRORS as exc:
            log.warning("service_mark_down_failed", host=self.cfg.host, error=str(exc))
            return
        log.info("service_marked_down", host=self.cfg.host)

    async def _count_instances(self) -> None:
        """The census (``conductor/census.py``) every report interval."""
        while True:
            try:
                async with self._db_context() as ctxt:
                    await self.census.run_once(ctxt)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("instance_census_failed", exc_info=True)
            await asyncio.sleep(self.cfg.service.report_interval)

    @property
    def ready(self) -> bool:
        """What ``/readyz`` reports: started, not stopping (draining), consuming, and the
        broker link up right now. The database is not probed: a readiness probe runs every few
        seconds on every conductor, and one down database would take them all out of service
        at once, where requests that do not need it (or retry) would still be answered."""
        return (
            self._started
            and not self._stopping
            and self.server.running
            and self.transport.connected
        )

    async def reload(self) -> None:
        """SIGHUP: re-read the compute upgrade levels now."""
        levels = await self.levels.refresh()
        log.info("conductor_reload", host=self.cfg.host, version_cap=levels.rpc_version_cap)

    def _grace(self) -> float:
        return float(self.cfg.service.graceful_shutdown_timeout)
