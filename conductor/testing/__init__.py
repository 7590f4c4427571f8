"""An in-process conductor for fast tests: the real endpoints, RPC runtime and serializer over
the in-memory transport, on a database of your choice.

    async with local_conductor("sqlite+aiosqlite:///x.db") as conductor:
        # FleetObject.indirection_api now points at conductor.api: remotables go through
        # JSON + FleetObjectSerializer + the indirection endpoint, as on a real agent.
        inst = await Instance.get_by_uuid(conductor.agent_context(), uuid)

Shipped in the package (not under tests/) so every team's tests can use the same fake.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from oslo_utils import versionutils
from sqlalchemy import select

from conductor.db import migration, models
from conductor.db.session import Database
from conductor.indirection import BaseAPIEndpoint, ConductorIndirectionEndpoint
from conductor.liveness import LivenessBatcher, LivenessEndpoint
from shared_objects import fields, objects
from shared_objects.base import FleetObject, FleetObjectRegistry, IndirectionAPI
from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.policy import CONDUCTOR_RPC_POLICY
from shared_objects.rpc_clients.conductor import TOPIC as CONDUCTOR_TOPIC
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.authorizer import RoleAuthorizer, reply_checks
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import RPCServer, Target, Transport, get_transport
from shared_objects.runtime.messaging.memory import broker_for
from shared_objects.serializer import FleetObjectSerializer
from shared_objects.testing.memory import as_login, broker_name, memory_messaging


@contextlib.contextmanager
def indirection(api: IndirectionAPI | None) -> Any:
    """Install ``api`` as ``FleetObject.indirection_api`` for the block, then restore."""
    previous = FleetObject.indirection_api
    FleetObject.indirection_api = api
    try:
        yield api
    finally:
        FleetObject.indirection_api = previous


@dataclasses.dataclass
class LocalConductor:
    database: Database
    endpoint: ConductorIndirectionEndpoint
    server: RPCServer
    api: ConductorAPI
    transport: Transport

    login: str = "fleet-operator"
    # The agents' beats (report_alive); None on a conductor of an older release.
    liveness: LivenessBatcher | None = None

    def agent_context(self, **kwargs: Any) -> RequestContext:
        """A context as the client has it: no database handle. ``caller`` is the client's
        login (never sent: on RPC the server takes it from the broker), so the endpoints can
        also be called directly with it."""
        kwargs.setdefault("caller", self.login)
        return RequestContext(**kwargs)

    @contextlib.asynccontextmanager
    async def db_context(self, **kwargs: Any) -> AsyncIterator[RequestContext]:
        """A conductor-side context with its own unit of work (committed at the end)."""
        ctxt = RequestContext(**kwargs)
        async with self.database.request(ctxt):
            yield ctxt


@contextlib.asynccontextmanager
async def local_conductor(
    database_url: str,
    *,
    migrate: bool = True,
    install: bool = True,
    messaging: MessagingConfig | None = None,
    login: str = "fleet-operator",
    report_alive: bool = True,
    liveness_delay: float = 0.05,
) -> AsyncIterator[LocalConductor]:
    """Run a conductor (endpoints + RPC server) and a client for it inside this process.

    The conductor serves under a conductor login with authorisation on (the real policy); the
    client logs in as ``login``: an operator by default, ``fleet-host-<host>`` to act as that
    host's agent. On a ``memory://`` transport the two are separate drivers on one broker, so
    every request carries the client's login as its validated ``user_id``, as on RabbitMQ.

    ``report_alive=False`` serves what a conductor of release 1.1 serves: conductor API 1.0
    without ``report_alive`` (agents must fall back to ``Service.heartbeat``).
    """
    if migrate:
        await migration.upgrade(database_url)
    database = Database(database_url)
    cfg = messaging or memory_messaging()
    identities = Identities()
    endpoint = ConductorIndirectionEndpoint(database, identities)
    endpoints: list[Any] = [endpoint, BaseAPIEndpoint()]
    policy = {k: v for k, v in CONDUCTOR_RPC_POLICY.items() if k[0] != "compute_task"}
    liveness: LivenessBatcher | None = None
    if report_alive:
        liveness = LivenessBatcher(database, max_delay=liveness_delay)
        endpoints.append(LivenessEndpoint(liveness))
    else:
        endpoint.target = Target(version="1.0")  # the API of release 1.1
        del policy[(None, "report_alive")]
    server_transport, transport = _login_transports(cfg, "fleet-conductor-local", login)
    try:
        async with server_transport, transport:
            server = RPCServer(
                server_transport,
                Target(topic=CONDUCTOR_TOPIC, server="local"),
                endpoints=endpoints,
                serializer=FleetObjectSerializer(),
                authorizer=RoleAuthorizer(identities, policy, service="conductor"),
                require_user_id=True,
            )
            api = ConductorAPI(transport, timeout=30.0, reply_from=reply_checks(identities))
            local = LocalConductor(database, endpoint, server, api, transport, login, liveness)
            async with server:
                try:
                    if install:
                        with indirection(api):
                            yield local
                    else:
                        yield local
                finally:
                    if liveness is not None:
                        await liveness.stop()
    finally:
        await database.dispose()


def _login_transports(
    cfg: MessagingConfig, server_login: str, client_login: str
) -> tuple[Transport, Transport]:
    """The conductor's and the client's transports: two logins on one broker (on RabbitMQ the
    URL's credentials are used for both; give a memory:// URL to test authorisation)."""
    url = cfg.transport_url
    if not url.startswith("memory://"):
        same = get_transport(cfg, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
        return same, same
    broker = broker_for(broker_name(cfg))
    server, client = as_login(cfg, server_login), as_login(cfg, client_login)
    return (
        get_transport(server, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS, memory_broker=broker),
        get_transport(client, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS, memory_broker=broker),
    )


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Register test-only object versions inside the block; the registry is restored after.

    oslo keeps one process-wide table behind every registry, so this snapshots and restores it
    in place.
    """
    table = FleetObjectRegistry.obj_classes()
    saved = {name: list(classes) for name, classes in table.items()}
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


NEWER_INSTANCE_FIELD = "test_only_note"
NEWER_INSTANCE_VALUE = "held by a newer release"
CURRENT_INSTANCE_VERSION = objects.Instance.VERSION
_MAJOR, _MINOR = CURRENT_INSTANCE_VERSION.split(".")
NEWER_INSTANCE_VERSION = f"{_MAJOR}.{int(_MINOR) + 1}"


def register_newer_instance() -> type[objects.Instance]:
    """Register a test-only Instance one minor above the release's, adding ``test_only_note``
    (use in isolated_registry); ``NEWER_INSTANCE_VERSION`` / ``CURRENT_INSTANCE_VERSION`` name both.

    Rows read through it carry ``locked_reason`` set, so a backport to 1.0 visibly drops it.
    """

    class Instance(objects.Instance):  # the class name is the object's wire name
        # (the release's history, then) Version 1.x+1: Added test_only_note (test only)
        VERSION = NEWER_INSTANCE_VERSION

        fields = {
            **objects.Instance.fields,
            NEWER_INSTANCE_FIELD: fields.StringField(nullable=True),
        }

        @staticmethod
        def _from_db_object(
            context: Any,
            instance: objects.Instance,
            row: Mapping[str, Any],
            expected_attrs: Iterable[str] | None = None,
            security_groups: Any = None,
        ) -> objects.Instance:
            objects.Instance._from_db_object(
                context, instance, row, expected_attrs, security_groups
            )
            setattr(instance, NEWER_INSTANCE_FIELD, NEWER_INSTANCE_VALUE)
            instance.obj_reset_changes([NEWER_INSTANCE_FIELD])
            return instance

        def obj_make_compatible(self, primitive: dict[str, Any], target_version: str) -> None:
            super().obj_make_compatible(primitive, target_version)
            newer = versionutils.convert_version_to_tuple(NEWER_INSTANCE_VERSION)
            if versionutils.convert_version_to_tuple(target_version) < newer:
                primitive.pop(NEWER_INSTANCE_FIELD, None)

    FleetObjectRegistry.register(Instance)
    return Instance


async def snapshot(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (sorted), to prove a request changed nothing."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with database.engine.connect() as conn:
        for table in models.metadata.sorted_tables:
            rows = (await conn.execute(select(table))).all()
            out[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return out
