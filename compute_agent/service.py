"""One compute agent: its hypervisor, its claims, its RPC server, its heartbeat.

Start order matters for correctness after a crash: the hypervisor's state is loaded first, then
the instances the database places here are reconciled with it, then usage is recomputed from what
survived, and only then does the agent consume RPC (so no new build races the recovery). Once its
queue exists, the guests' firewalls are brought in line with the database in the background, and
again after every broker reconnect (rule-change casts a restart dropped are never waited for).

Stop order (SIGTERM), the one both services share (``shared_objects.runtime.service_runner``): stop
consuming and let running handlers finish within the grace period (casts not yet started stay in
the queue), then unwind what start built, in reverse: live-migration monitors, a rules resync
(the next start does one), the reconnect hook, builds still running, the resource tracker, the
upgrade-level refresh, the heartbeat, then the service is marked down at once (``last_seen_up``
cleared): the conductor then treats this host as down and hands the builds still queued for it
to other hosts instead of waiting ``service_down_time``. The hypervisor is released and the
broker connection closed last. The next start registers the service, which marks it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import structlog

from compute_agent.build import BuildManager
from compute_agent.endpoint import ComputeEndpoint
from compute_agent.init_host import recover_instances
from compute_agent.live_migration import LiveMigrationManager, LiveMigrationSettings
from compute_agent.liveness import AgentBeat
from compute_agent.peer_auth import PeerCheck
from compute_agent.reply_serializer import CallerReleaseSerializer
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.rpc_errors import virt_errors_translated
from compute_agent.security_groups import RulesResync, RulesWatch, SecurityGroupManager
from compute_agent.transient import TRANSIENT_ERRORS, Retrier, RetryPolicy, short
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from compute_agent.virt.loader import create_driver
from compute_agent.volumes import VolumeManager
from shared_objects import exception, releases
from shared_objects.base import FleetObject, use_indirection_api
from shared_objects.context import RequestContext, admin_context
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.service import ServiceReporter
from shared_objects.policy import COMPUTE_RPC_POLICY
from shared_objects.rpc_clients.compute import TOPIC as COMPUTE_TOPIC
from shared_objects.rpc_clients.compute import ComputeAPI
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.authorizer import RoleAuthorizer, reply_checks
from shared_objects.runtime.config import ConfigError, FleetConfig
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import (
    BrokerConnectFailed,
    MessagingError,
    RPCServer,
    Target,
    Transport,
    get_transport,
)
from shared_objects.runtime.metrics import ServiceMetrics
from shared_objects.runtime.startup_retry import retry_at_start
from shared_objects.serializer import FleetObjectSerializer
from shared_objects.startup_checks import check_conductors_not_older
from shared_objects.upgrade_levels import ComputeUpgradeLevels

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


def make_driver(cfg: FleetConfig) -> ComputeDriver:
    """The hypervisor configured from ``[compute]`` (``driver``: fake or qemu); ``ConfigError``
    for a value the driver refuses (the syntax of ``failures`` and ``migration`` is the fake's)."""
    try:
        if cfg.compute.driver == "qemu":
            return create_driver("qemu", cfg.compute.qemu_driver_options())
        return FakeDriver(FakeDriverConfig.from_mapping(cfg.compute.fake_driver_options()))
    except ValueError as exc:
        raise ConfigError(f"[compute] {exc}") from exc


class ComputeAgentService:
    """The agent process's long-lived parts, with an explicit start/stop lifecycle."""

    def __init__(
        self,
        cfg: FleetConfig,
        *,
        driver: ComputeDriver | None = None,
        transport: Transport | None = None,
        conductor_wait: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.host = cfg.host
        self.driver = driver if driver is not None else make_driver(cfg)
        self._own_transport = transport is None
        self.transport = (
            transport
            if transport is not None
            else get_transport(cfg.messaging, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
        )
        self.identities = Identities(cfg.security)
        # Replies count only from the login the call went to (a conductor, or the peer host).
        replies = reply_checks(self.identities)
        self.conductor = ConductorAPI(self.transport, reply_from=replies)
        self.tasks = ComputeTaskAPI(self.transport, reply_from=replies)
        self.metrics = ServiceMetrics("compute-agent", host=cfg.host)
        self.notifier = InstanceNotifier(
            self.transport, f"compute.{cfg.host}", enabled=cfg.notifications.enabled
        )
        compute = cfg.compute
        self.tracker = ResourceTracker(
            cfg.host,
            self.driver,
            cpu_allocation_ratio=compute.cpu_allocation_ratio,
            ram_allocation_ratio=compute.ram_allocation_ratio,
            disk_allocation_ratio=compute.disk_allocation_ratio,
        )
        # Shared: a rule refresh for an instance still being built here is applied by its build.
        rules_watch = RulesWatch()
        # Flows ride out database and broker outages up to this bound (compute_agent/transient).
        self.calls = Retrier(RetryPolicy(total=cfg.service.outage_retry_timeout))
        self.build = BuildManager(
            cfg.host,
            self.driver,
            self.tracker,
            self.tasks,
            self.notifier,
            rules_watch,
            calls=self.calls,
        )
        # Peer calls (live migration) carry objects through the conductor's indirection.
        # Peers of an older release get calls and objects they understand (auto version cap).
        self.levels = ComputeUpgradeLevels(
            cfg.upgrade_levels.compute,
            self._context,
            service_down_time=cfg.service.service_down_time,
            refresh_interval=cfg.upgrade_levels.refresh_interval,
            # Read when a peer call needs them, not on a timer: a timed read of every compute
            # service by every agent costs the conductors O(hosts²) (upgrade_levels.py).
            on_demand=True,
        )
        self.compute = ComputeAPI(
            self.transport,
            FleetObjectSerializer(indirection_api=self.conductor),
            levels=self.levels,
            reply_from=replies,
        )
        self.live_migration = LiveMigrationManager(
            cfg.host,
            self.driver,
            self.tracker,
            self.compute,
            self.notifier,
            LiveMigrationSettings.from_config(cfg.live_migration),
            calls=self.calls,
        )
        self.security = SecurityGroupManager(self.driver, rules_watch)
        # Casts that change rules can be lost with the broker: re-apply what the database holds
        # at start and after every reconnect (compute_agent/security_groups.py).
        self.rules_resync = RulesResync(self._resync_rules, self._in_own_context)
        self.endpoint = ComputeEndpoint(
            self.build,
            VolumeManager(cfg.host, self.driver, self.notifier, self.calls),
            self.security,
            self.live_migration,
            PeerCheck(cfg.host),
        )
        self.server = RPCServer(
            self.transport,
            Target(topic=COMPUTE_TOPIC, server=cfg.host),
            endpoints=[self.endpoint],
            # Safety net: an object too new for this agent is backported by the conductor,
            # and counted (fleet_object_backports_total) so operators see who sent it.
            # Replies go back at the caller's release (see reply_serializer).
            serializer=CallerReleaseSerializer(
                indirection_api=self.conductor,
                on_backport=lambda name: self.metrics.object_backports.labels(object=name).inc(),
            ),
            # Conductors (and live-migration peers) only: shared_objects/policy.py.
            authorizer=RoleAuthorizer(self.identities, COMPUTE_RPC_POLICY, service=cfg.host),
            # Only compute.<host>: the bare "compute" queue would hand this host others' work.
            listen_on_topic=False,
            require_user_id=True,
            # Driver errors leave as the shared contract's (compute_agent/rpc_errors.py).
            error_boundary=virt_errors_translated,
        )
        beat = AgentBeat(self.conductor, service_down_time=cfg.service.service_down_time)
        self.live_migration.sweep_wanted = beat.sweep_wanted
        self.reporter = ServiceReporter(
            self._context,
            host=cfg.host,
            binary=releases.BINARY_COMPUTE,
            topic=COMPUTE_TOPIC,
            version=releases.SERVICE_VERSION,
            interval=cfg.service.report_interval,
            # report_alive where every live conductor has it (compute_agent/liveness.py).
            beat=beat,
        )
        self.conductor_wait = (
            cfg.service.start_retry_timeout if conductor_wait is None else conductor_wait
        )
        # What start() built, unwound by stop() (or by start() itself when a step fails).
        self._running = contextlib.AsyncExitStack()
        self._started = False
        # From the first moment of stop(): /readyz answers 503 for the whole drain.
        self._stopping = False
        self._contextvars = contextvars.copy_context()

    @property
    def ready(self) -> bool:
        """What ``/readyz`` reports: started, not stopping (draining), consuming, and the
        broker link up right now. Cheap: no broker or conductor round trip per probe."""
        return (
            self._started
            and not self._stopping
            and self.server.running
            and self.transport.connected
        )

    @contextlib.asynccontextmanager
    async def _context(self) -> AsyncIterator[RequestContext]:
        yield admin_context(releases.BINARY_COMPUTE)

    async def _wait_for_conductor(self) -> None:
        """Wait until a conductor answers ``ping`` (agents can start before conductors)."""
        topic = self.conductor.client.target.topic
        # A few pings within the bound, each waiting at most 5 s.
        ping_wait = min(5.0, max(self.conductor_wait / 3, 0.5))

        def describe(exc: BaseException) -> str:
            return (
                f"no conductor answered on topic {topic!r} ({short(exc)}): is a conductor "
                "running, on the same broker vhost and control exchange?"
            )

        await retry_at_start(
            "conductor",
            lambda: self.conductor.ping(admin_context(), "agent-start", wait=ping_wait),
            bound=self.conductor_wait,
            retry_on=(MessagingError,),
            describe=describe,
        )

    def check_identity(self) -> None:
        """Refuse to run on a broker login that is not this host's: the conductor would refuse
        every call of this agent, and its peers every reply."""
        login = self.transport.user_id
        if login not in self.identities.host_logins(self.host):
            raise exception.WrongIdentity(
                service=f"compute agent of {self.host}",
                login=login,
                expected=repr(self.identities.login_for_host(self.host)),
            )
        log.info("security_identities", login=login, **self.identities.describe())

    async def run_as_agent(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await ``coro`` as this agent: its object calls go out under this agent's login
        (tests that drive one of several in-process agents directly)."""
        result: _T = await self._in_own_context(coro)
        return result

    def _in_own_context(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` (and every task it starts) with this agent's conductor client as the
        current indirection API: several agents can share a process (in-process test fleets),
        each reaching the conductor under its own login."""
        context = self._contextvars.copy()
        return asyncio.get_running_loop().create_task(coro, context=context)

    async def start(self) -> None:
        self._stopping = False
        self._contextvars = contextvars.copy_context()
        self._contextvars.run(use_indirection_api, self.conductor)
        await self._in_own_context(self._start())

    async def _start(self) -> None:
        """Build the agent step by step; each step's undo is pushed on an ``AsyncExitStack``
        before the step runs, so a step that fails unwinds what the steps before it built (in
        reverse) and re-raises: a failed start leaves no connection or task behind."""
        stack = contextlib.AsyncExitStack()
        try:
            instances = await self._build_running(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._running = stack
        self._started = True
        log.info("compute_agent_started", host=self.host, instances=len(instances))

    async def _build_running(self, stack: contextlib.AsyncExitStack) -> list[Any]:
        # Needs no connection: a login that is not this host's is a configuration error.
        self.check_identity()
        if self._own_transport:
            stack.push_async_callback(self.transport.close)
            await retry_at_start(
                "broker",
                self.transport.connect,
                bound=self.cfg.service.start_retry_timeout,
                retry_on=(BrokerConnectFailed,),
                describe=str,
            )
        # Every remotable object call in this process goes to the conductor.
        FleetObject.indirection_api = self.conductor
        stack.callback(self._forget_indirection_api)
        await self._wait_for_conductor()
        ctxt = admin_context(releases.BINARY_COMPUTE)
        await check_conductors_not_older(
            ctxt, releases.BINARY_COMPUTE, self.cfg.service.service_down_time
        )
        stack.push_async_callback(self.driver.cleanup_host)
        await self.driver.init_host(self.host)
        # Registering marks the service up: from here on, unwinding marks it down again.
        stack.push_async_callback(self._mark_down)
        stack.push_async_callback(self.reporter.stop)
        await self.reporter.start()
        stack.push_async_callback(self.levels.stop)
        await self.levels.start()
        instances = await recover_instances(ctxt, self.host, self.driver, self.calls)
        # Interrupted live migrations (source or destination side) settle before claims.
        instances = await self.live_migration.recover(ctxt, instances)
        stack.push_async_callback(self._stop_tracker)
        await self.tracker.start(ctxt, instances)
        self.metrics.watch_rpc("server", self.server.stats)
        self.server.latency_observer = self.metrics.latency_observer("server")
        # What this agent asks of others: object calls, compute-task calls, peer calls (at
        # this release; calls to older peers use per-release clients that are not counted).
        for client in (self.conductor.client, self.tasks.client, self.compute.client):
            self.metrics.watch_rpc("client", client.stats)
        self.metrics.watch_transport(self.transport.stats)
        # Builds come in through the server: they stop after it (stop() drains it first).
        stack.push_async_callback(self.build.stop)
        stack.push_async_callback(self.server.stop, 0)
        await self.server.start()
        # After the queue exists: a rule change committed from here on is cast into it (or,
        # if the cast is lost with the broker, the reconnect's resync reads it).
        stack.callback(self.transport.on_reconnect(lambda: self.rules_resync.request("reconnect")))
        stack.push_async_callback(self.rules_resync.stop)
        self.rules_resync.start()
        stack.push_async_callback(self.live_migration.stop)
        self.live_migration.start()
        return list(instances)

    async def stop(self, grace: float | None = None) -> None:
        """Stop in the order both services share (``shared_objects.runtime.service_runner``): stop
        taking work and drain (up to ``grace``), then unwind what ``start`` built, in reverse
        (see the module docstring)."""
        await self._in_own_context(self._stop(grace))

    async def _stop(self, grace: float | None = None) -> None:
        grace = self.cfg.service.graceful_shutdown_timeout if grace is None else grace
        self._stopping = True
        await self.server.stop(grace=grace)
        stack, self._running = self._running, contextlib.AsyncExitStack()
        await stack.aclose()
        self._started = False
        log.info("compute_agent_stopped", host=self.host)

    async def _stop_tracker(self) -> None:
        # Its last usage report goes to the conductor: not worth waiting for through an outage.
        with contextlib.suppress(MessagingError):
            await self.tracker.stop()

    def _forget_indirection_api(self) -> None:
        if FleetObject.indirection_api is self.conductor:
            FleetObject.indirection_api = None

    async def _resync_rules(self, reason: str) -> None:
        await self.security.resync(admin_context(releases.BINARY_COMPUTE), self.calls, reason)

    async def _mark_down(self) -> None:
        """Clear ``last_seen_up``: the service is down from now on, not ``service_down_time``
        after its last heartbeat. Short retries only: a stop must not hang on an outage (the
        service then goes down the usual way, by silence)."""
        service = self.reporter.service
        if service is None:
            return
        service.last_seen_up = None
        try:
            await self.calls.with_total(5.0).call("mark service down", service.save)
        except TRANSIENT_ERRORS as exc:
            log.warning("service_mark_down_failed", host=self.host, error=short(exc))
            return
        except exception.FleetException as exc:
            log.warning("service_mark_down_failed", host=self.host, error=short(exc))
            return
        log.info("service_marked_down", host=self.host)

    async def reload(self) -> None:
        """SIGHUP: re-read the upgrade levels now (e.g. after an old agent was removed)."""
        levels = await self.levels.refresh()
        log.info("compute_agent_reload", host=self.host, version_cap=levels.rpc_version_cap)

    def stats(self) -> dict[str, Any]:
        return {"server": self.server.stats(), "claims": len(self.tracker.claims.claimed_uuids)}
