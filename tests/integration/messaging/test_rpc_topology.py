"""Declarations and connection options on the real RabbitMQ: oslo-identical declarations for
quorum options (a redeclaration with oslo's flags must not be refused; the reply queue, which no
oslo peer declares, is exclusive unless it is a quorum queue), multi-host failover."""

from __future__ import annotations

import time
from typing import Any

import aio_pika
import aiormq
import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessageDeliveryFailure,
    MessagingError,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.testing.broker import BrokerJanitor

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Ping:
    @expose
    async def ping(self, ctxt: RequestContext) -> str:
        return "pong"


@pytest.mark.parametrize("transient_quorum", [False, True])
async def test_quorum_declarations_are_identical_to_oslos(
    amqp_url: str,
    control_exchange: str,
    unique_topic: str,
    janitor: BrokerJanitor,
    transient_quorum: bool,
) -> None:
    config = MessagingConfig(
        transport_url=amqp_url,
        control_exchange=control_exchange,
        rabbit_quorum_queue=True,
        rabbit_transient_quorum_queue=transient_quorum,
    )
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with get_transport(config) as transport:
        server = RPCServer(transport, Target(topic=unique_topic, server="s1"), [Ping()])
        async with server:
            client = RPCClient(transport, Target(topic=unique_topic), timeout=5)
            assert await client.call(None, "ping") == "pong"
            fanout_queue = server._fanout_queue
            assert fanout_queue is not None
            # What oslo's rabbit driver declares for the same options (impl_rabbit.py); any
            # difference in a flag or argument makes the broker close the channel (406).
            expected: list[tuple[str, bool, dict[str, Any]]] = [
                (unique_topic, True, {"x-queue-type": "quorum"}),
                (f"{unique_topic}.s1", True, {"x-queue-type": "quorum"}),
                (
                    fanout_queue.name,
                    transient_quorum,
                    {"x-queue-type": "quorum", "x-expires": 1800000}
                    if transient_quorum
                    else {"x-expires": 1800000},
                ),
            ]
            if transient_quorum:
                # A quorum queue cannot be exclusive: the reply queue is a shared one then.
                expected.append(
                    (
                        transport.replies.queue_name,
                        True,
                        {"x-queue-type": "quorum", "x-expires": 1800000},
                    )
                )
            connection = await aio_pika.connect(amqp_url.replace("rabbit://", "amqp://"))
            async with connection:
                channel = await connection.channel()
                await channel.declare_exchange(
                    control_exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                await channel.declare_exchange(
                    f"{unique_topic}_fanout",
                    aio_pika.ExchangeType.FANOUT,
                    durable=transient_quorum,
                    auto_delete=True,
                )
                for name, durable, arguments in expected:
                    await channel.declare_queue(
                        name, durable=durable, auto_delete=False, arguments=arguments
                    )
                assert not channel.is_closed
                if not transient_quorum:
                    # Otherwise the reply queue is exclusive to its connection: no other
                    # connection can declare (or consume, or delete) it, whatever the flags.
                    with pytest.raises(aiormq.exceptions.ChannelLockedResource):
                        await channel.declare_queue(
                            transport.replies.queue_name,
                            auto_delete=False,
                            arguments={"x-expires": 1800000},
                        )


async def test_multi_host_url_fails_over_to_a_live_host(
    control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    # Ports 1 and 2 on loopback refuse connections: the first two hosts are "down".
    url = "rabbit://guest:guest@127.0.0.1:1,guest:guest@127.0.0.1:2,guest:guest@127.0.0.1:5672/"
    config = MessagingConfig(transport_url=url, control_exchange=control_exchange)
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with get_transport(config, connect_timeout=5) as transport:
        assert transport.user_id == "guest"
        async with RPCServer(transport, Target(topic=unique_topic, server="s1"), [Ping()]):
            assert (
                await RPCClient(transport, Target(topic=unique_topic), timeout=5).call(None, "ping")
                == "pong"
            )


async def test_inequivalent_existing_queue_fails_start_clearly_and_transport_survives(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    connection = await aio_pika.connect(amqp_url.replace("rabbit://", "amqp://"))
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(unique_topic, durable=True)  # oslo with other options did this
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with get_transport(config) as transport:
        server = RPCServer(transport, Target(topic=unique_topic, server="s1"), [Ping()])
        with pytest.raises(MessagingError, match=r"PRECONDITION_FAILED|inequivalent"):
            await server.start()
        assert not server.running
        # The connection is intact: another topic works.
        other = f"{unique_topic}-b"
        janitor.server_topology(control_exchange, other, "s1")
        async with RPCServer(transport, Target(topic=other, server="s1"), [Ping()]):
            assert (
                await RPCClient(transport, Target(topic=other), timeout=5).call(None, "ping")
                == "pong"
            )


async def test_inequivalent_control_exchange_fails_publish_clearly(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    janitor.exchanges.update({control_exchange, f"{unique_topic}_fanout"})
    connection = await aio_pika.connect(amqp_url.replace("rabbit://", "amqp://"))
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(control_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with get_transport(config) as transport:
        client = RPCClient(transport, Target(topic=unique_topic), timeout=5)
        start = time.monotonic()
        with pytest.raises(MessageDeliveryFailure, match="PRECONDITION_FAILED"):
            await client.cast(None, "ping")
        assert time.monotonic() - start < 2
        # The publisher channel recovers for messages that are fine.
        await client.prepare(fanout=True).cast(None, "ping")
        assert transport.stats()["publish_failures"] == 1
