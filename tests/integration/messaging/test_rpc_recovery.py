"""Recovery without a broker restart: queues deleted under a running server and client are
declared again and consumed again (the broker cancels the consumers; we resume). The client's
reply queue is exclusive, so only its own connection can delete it."""

from __future__ import annotations

import asyncio
import time

import aiormq
import pytest
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingError,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.testing.broker import BrokerJanitor, delete_entities

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Ping:
    @expose
    async def ping(self, ctxt: RequestContext) -> str:
        return "pong"


async def _until_pong(client: RPCClient, within: float) -> float:
    start = time.monotonic()
    while True:
        try:
            assert await client.prepare(timeout=1.0).call(None, "ping") == "pong"
            return time.monotonic() - start
        except MessagingError:
            assert time.monotonic() - start < within, "service did not recover"


async def test_deleted_server_and_reply_queues_are_recreated(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with get_transport(config) as server_t, get_transport(config) as client_t:
        told: list[str] = []
        server_t.on_reconnect(lambda: told.append("queue back"))
        async with RPCServer(server_t, Target(topic=unique_topic, server="s1"), [Ping()]):
            client = RPCClient(client_t, Target(topic=unique_topic), timeout=5)
            assert await client.call(None, "ping") == "pong"
            # The reply queue is exclusive: no other connection may delete it...
            with pytest.raises(aiormq.exceptions.ChannelLockedResource):
                await delete_entities(amqp_url, queues=[client_t.replies.queue_name])
            with capture_logs() as logs:
                await delete_entities(amqp_url, queues=[unique_topic])
                # ...but its own connection can (as a lost quorum node would for shared ones).
                await client_t.driver.delete_queue(client_t.replies.queue_name)
                took = await _until_pong(client, within=15)
            events = [e["event"] for e in logs]
            assert events.count("consumer_cancelled_by_broker") == 2
            assert events.count("consumer_recovered") == 2
            # Casts sent while the server's queue was gone are lost: its transport says so.
            assert told == ["queue back"]
            assert took < 10
            assert await client.prepare(server="s1").call(None, "ping") == "pong"
            await asyncio.gather(*[client.call(None, "ping") for _ in range(50)])
            assert client_t.pending_replies == 0
