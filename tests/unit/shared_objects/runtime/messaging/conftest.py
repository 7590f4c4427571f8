"""Fixtures of the in-memory RPC tests: one memory broker, a server and a client transport on it,
and a server of ``rpc_memory_endpoint.Endpoint`` with a client of it; for the security tests of
the runtime, ``sec_transports`` (logged in as a conductor and as an agent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from rpc_memory_endpoint import TOPIC, Endpoint, LocalError, memory_config
from security_endpoints import security_config

from shared_objects.runtime.messaging import (
    MemoryBroker,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    get_transport,
)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def transports(broker: MemoryBroker) -> AsyncIterator[tuple[Transport, Transport]]:
    """(server transport as user 'host1', client transport as user 'alice') on one broker."""
    server_t = get_transport(memory_config("host1"), memory_broker=broker)
    client_t = get_transport(
        memory_config("alice"), allowed_remote_exmods=[LocalError.__module__], memory_broker=broker
    )
    async with server_t, client_t:
        yield server_t, client_t


@pytest.fixture
async def served(
    transports: tuple[Transport, Transport],
) -> AsyncIterator[tuple[Endpoint, RPCClient]]:
    server_t, client_t = transports
    endpoint = Endpoint()
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [endpoint]):
        yield endpoint, RPCClient(client_t, Target(topic=TOPIC, version="1.2"), timeout=2.0)


@pytest.fixture
async def sec_transports(broker: MemoryBroker) -> AsyncIterator[tuple[Transport, Transport]]:
    """(server transport as login 'conductor', client transport as login 'host-1')."""
    server_t = get_transport(security_config("conductor"), memory_broker=broker)
    client_t = get_transport(security_config("host-1"), memory_broker=broker)
    async with server_t, client_t:
        yield server_t, client_t
