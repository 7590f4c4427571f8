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
import uuid
from collections.abc import AsyncIterator
from typing import Any

from conductor.db import migration
from conductor.db.session import Database
from conductor.indirection import (
    CONDUCTOR_TOPIC,
    BaseAPIEndpoint,
    ConductorIndirectionEndpoint,
)
from conductor.rpcapi import ConductorAPI
from shared_objects.base import FleetObject, IndirectionAPI
from shared_objects.config import MessagingConfig
from shared_objects.context import RequestContext
from shared_objects.messaging import RPCServer, Target, Transport, get_transport
from shared_objects.serializer import FleetObjectSerializer

ALLOWED_EXMODS = ["shared_objects.exception"]


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

    @staticmethod
    def agent_context(**kwargs: Any) -> RequestContext:
        """A context as an agent has it: no database handle."""
        return RequestContext(**kwargs)

    @contextlib.asynccontextmanager
    async def db_context(self, **kwargs: Any) -> AsyncIterator[RequestContext]:
        """A conductor-side context with its own unit of work (committed at the end)."""
        ctxt = RequestContext(**kwargs)
        async with self.database.request(ctxt):
            yield ctxt


def memory_messaging_config(name: str | None = None) -> MessagingConfig:
    """Messaging settings for a private in-memory broker."""
    cfg = MessagingConfig()
    cfg.transport_url = f"memory://{name or uuid.uuid4().hex}"
    cfg.control_exchange = f"fleet-local-{uuid.uuid4().hex[:8]}"
    return cfg


@contextlib.asynccontextmanager
async def local_conductor(
    database_url: str,
    *,
    migrate: bool = True,
    install: bool = True,
    messaging: MessagingConfig | None = None,
) -> AsyncIterator[LocalConductor]:
    """Run a conductor (endpoints + RPC server) and a client for it inside this process."""
    if migrate:
        await migration.upgrade(database_url)
    database = Database(database_url)
    cfg = messaging or memory_messaging_config()
    transport = get_transport(cfg, allowed_remote_exmods=ALLOWED_EXMODS)
    endpoint = ConductorIndirectionEndpoint(database)
    try:
        async with transport:
            server = RPCServer(
                transport,
                Target(topic=CONDUCTOR_TOPIC, server="local"),
                endpoints=[endpoint, BaseAPIEndpoint()],
                serializer=FleetObjectSerializer(),
            )
            api = ConductorAPI(transport, timeout=30.0)
            async with server:
                if install:
                    with indirection(api):
                        yield LocalConductor(database, endpoint, server, api, transport)
                else:
                    yield LocalConductor(database, endpoint, server, api, transport)
    finally:
        await database.dispose()
