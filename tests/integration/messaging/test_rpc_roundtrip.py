"""Round trips over the real RabbitMQ: call, cast, server-targeted call, fanout, concurrency,
remote exceptions (acceptance a)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared_objects import exception as fleet_exception
from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    RemoteError,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    expose,
    get_transport,
)
from shared_objects.testing.broker import BrokerJanitor
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Echo:
    target = Target(version="2.4")

    def __init__(self, name: str) -> None:
        self.name = name
        self.casts: list[Any] = []

    @expose
    async def echo(self, ctxt: RequestContext, token: Any) -> dict[str, Any]:
        return {
            "token": token,
            "server": self.name,
            "caller": ctxt.caller,
            "request_id": ctxt.request_id,
        }

    @expose
    async def record(self, ctxt: RequestContext, token: Any) -> None:
        self.casts.append(token)

    @expose
    async def not_found(self, ctxt: RequestContext, instance: str) -> None:
        raise fleet_exception.InstanceNotFound(instance_uuid=instance)


@pytest.fixture
def config(amqp_url: str, control_exchange: str) -> MessagingConfig:
    return MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)


@pytest.fixture
async def client_transport(
    config: MessagingConfig, janitor: BrokerJanitor
) -> AsyncIterator[Transport]:
    transport = get_transport(config, allowed_remote_exmods=fleet_exception.ALLOWED_REMOTE_EXMODS)
    async with transport:
        yield transport
    janitor.queues.add(transport.replies.queue_name)


@pytest.fixture
async def server_transport(config: MessagingConfig) -> AsyncIterator[Transport]:
    async with get_transport(config) as transport:
        yield transport


async def test_call_cast_server_call_and_fanout_round_trip(
    server_transport: Transport,
    client_transport: Transport,
    janitor: BrokerJanitor,
    control_exchange: str,
    unique_topic: str,
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1", "s2")
    e1, e2 = Echo("s1"), Echo("s2")
    async with (
        RPCServer(server_transport, Target(topic=unique_topic, server="s1"), [e1]),
        RPCServer(server_transport, Target(topic=unique_topic, server="s2"), [e2]),
    ):
        client = RPCClient(client_transport, Target(topic=unique_topic, version="2.1"), timeout=5)
        ctxt = RequestContext(request_id="req-roundtrip")

        result = await client.call(ctxt, "echo", token="t1")
        assert result["token"] == "t1" and result["server"] in {"s1", "s2"}
        assert result["caller"] == "guest"  # the broker-validated AMQP user_id
        assert result["request_id"] == "req-roundtrip"

        for i in range(6):
            assert (await client.prepare(server="s2").call(ctxt, "echo", token=i))["server"] == "s2"

        await client.cast(ctxt, "record", token="cast")
        await client.prepare(server="s1").cast(ctxt, "record", token="direct")
        await client.prepare(fanout=True).cast(ctxt, "record", token="fanout")
        await eventually(
            lambda: "fanout" in e1.casts and "fanout" in e2.casts and "direct" in e1.casts,
            5.0,
            interval=0.02,
        )
        await eventually(lambda: "cast" in e1.casts + e2.casts, 5.0, interval=0.02)
        assert (e1.casts + e2.casts).count("cast") == 1
        assert "direct" not in e2.casts


async def test_1000_concurrent_calls_each_result_reaches_its_caller(
    server_transport: Transport,
    client_transport: Transport,
    janitor: BrokerJanitor,
    control_exchange: str,
    unique_topic: str,
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with RPCServer(server_transport, Target(topic=unique_topic, server="s1"), [Echo("s1")]):
        client = RPCClient(client_transport, Target(topic=unique_topic, version="2.0"), timeout=30)
        tokens = [uuid.uuid4().hex for _ in range(1000)]
        results = await asyncio.gather(*[client.call(None, "echo", token=t) for t in tokens])
        assert [r["token"] for r in results] == tokens
        assert client_transport.pending_replies == 0
        assert client.pending_count == 0
        assert client.stats()["calls"]["echo:ok"] == 1000


async def test_fleet_exception_is_rebuilt_for_allowed_modules_else_remote_error(
    config: MessagingConfig,
    server_transport: Transport,
    client_transport: Transport,
    janitor: BrokerJanitor,
    control_exchange: str,
    unique_topic: str,
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with (
        RPCServer(server_transport, Target(topic=unique_topic, server="s1"), [Echo("s1")]),
        get_transport(config) as strict_transport,
    ):
        janitor.queues.add(strict_transport.replies.queue_name)
        allowed = RPCClient(client_transport, Target(topic=unique_topic, version="2.0"), timeout=5)
        with pytest.raises(fleet_exception.InstanceNotFound) as info:
            await allowed.call(None, "not_found", instance="i-1")
        assert type(info.value) is fleet_exception.InstanceNotFound
        assert info.value.kwargs == {"instance_uuid": "i-1"}
        assert "i-1" in str(info.value)

        strict = RPCClient(strict_transport, Target(topic=unique_topic, version="2.0"), timeout=5)
        with pytest.raises(RemoteError) as remote:
            await strict.call(None, "not_found", instance="i-2")
        assert remote.value.exc_type == "InstanceNotFound"
        assert "i-2" in str(remote.value.value)
