"""Notifier (oslo messagingv2 format) and the async serializer hook, on the memory transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MemoryBroker,
    Notifier,
    RPCClient,
    RPCServer,
    Target,
    codec,
    expose,
    get_transport,
)
from shared_objects.runtime.messaging.driver import Delivery
from shared_objects.runtime.messaging.topology import QueueSpec
from shared_objects.testing.eventually import eventually


def _config(user: str = "guest") -> MessagingConfig:
    return MessagingConfig(transport_url=f"memory://{user}@unit/", control_exchange="nova")


async def test_notification_goes_to_topic_priority_queue_declared_by_publisher() -> None:
    broker = MemoryBroker()
    async with get_transport(_config(), memory_broker=broker) as transport:
        notifier = Notifier(transport, "compute.host1", topics=["notifications", "audit_log"])
        ctxt = RequestContext(request_id="req-n", user_id="u1")
        await notifier.info(ctxt, "compute.instance.create.end", {"uuid": "i-1"})
        await notifier.prepare(publisher_id="compute.host2").warning(None, "compute.x", {})
        assert broker.message_count("notifications.info") == (1, 0)
        assert broker.message_count("audit_log.info") == (1, 0)
        assert broker.message_count("notifications.warn") == (1, 0)
        bodies: list[dict[str, Any]] = []

        async def take(delivery: Delivery) -> None:
            bodies.append(codec.decode_message(delivery.body))
            await delivery.ack()

        await transport.driver.subscribe([QueueSpec("notifications.info")], take)
        await transport.driver.subscribe([QueueSpec("notifications.warn")], take)
        await eventually(lambda: len(bodies) == 2, 1, interval=0.005)
        info, warn = bodies
        assert info["publisher_id"] == "compute.host1"
        assert info["event_type"] == "compute.instance.create.end"
        assert info["priority"] == "INFO"
        assert info["payload"] == {"uuid": "i-1"}
        assert info["_context_request_id"] == "req-n"
        assert {"message_id", "timestamp", "_unique_id"} <= info.keys()
        assert warn["priority"] == "WARN" and warn["publisher_id"] == "compute.host2"
        assert not any(k.startswith("_context_") for k in warn)


async def test_unknown_priority_is_rejected() -> None:
    async with get_transport(_config(), memory_broker=MemoryBroker()) as transport:
        with pytest.raises(ValueError):
            await Notifier(transport, "p").notify(None, "e", {}, "loud")


class Box:
    def __init__(self, value: Any) -> None:
        self.value = value


class BoxSerializer:
    """Boxes travel as {"box": value}; records the contexts it was given."""

    def __init__(self) -> None:
        self.contexts: list[Any] = []

    async def serialize_entity(self, ctxt: RequestContext, entity: Any) -> Any:
        self.contexts.append(ctxt)
        await asyncio.sleep(0)  # really async
        return {"box": entity.value} if isinstance(entity, Box) else entity

    async def deserialize_entity(self, ctxt: RequestContext, primitive: Any) -> Any:
        self.contexts.append(ctxt)
        return (
            Box(primitive["box"])
            if isinstance(primitive, dict) and "box" in primitive
            else primitive
        )


class Doubler:
    @expose
    async def double(self, ctxt: RequestContext, item: Box) -> Box:
        assert isinstance(item, Box)
        return Box(item.value * 2)


async def test_serializer_maps_arguments_and_results_on_both_sides() -> None:
    broker = MemoryBroker()
    server_ser, client_ser = BoxSerializer(), BoxSerializer()
    async with (
        get_transport(_config("host"), memory_broker=broker) as server_t,
        get_transport(_config("alice"), memory_broker=broker) as client_t,
        RPCServer(server_t, Target(topic="t", server="s"), [Doubler()], serializer=server_ser),
    ):
        client = RPCClient(client_t, Target(topic="t"), serializer=client_ser, timeout=2)
        ctxt = RequestContext(request_id="req-s")
        result = await client.call(ctxt, "double", item=Box(21))
        assert isinstance(result, Box) and result.value == 42
        assert len(client_ser.contexts) == 2 and all(c is ctxt for c in client_ser.contexts)
        assert [c.request_id for c in server_ser.contexts] == ["req-s", "req-s"]
        assert all(c.caller == "alice" for c in server_ser.contexts)
