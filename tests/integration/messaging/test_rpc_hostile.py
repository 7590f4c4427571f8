"""Hostile input over the real RabbitMQ (acceptance d): 1000 bad messages straight into a
server's queue. Each gets an error reply when addressable or a logged drop otherwise; the server
keeps serving; nothing stays unacknowledged."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    RPCClient,
    RPCServer,
    Target,
    Transport,
    expose,
    get_transport,
)
from shared_objects.testing.broker import (
    BrokerJanitor,
    queue_counts_ctl,
    ready_count,
    vhost_of,
)
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TEN_MB = 10 * 1024 * 1024


class Calculator:
    target = Target(namespace="calc", version="1.2")

    @expose
    async def add(self, ctxt: RequestContext, a: int, b: int) -> int:
        return a + b

    async def unexposed(self, ctxt: RequestContext) -> str:
        return "must not be reachable"


def envelope(inner: dict[str, Any], version: str = "2.0") -> bytes:
    return json.dumps({"oslo.version": version, "oslo.message": json.dumps(inner)}).encode()


def bad_messages(reply_q: str) -> tuple[list[bytes], set[str], int, int]:
    """1000 bodies; the msg ids that must get an error reply; counts of expected logged drops
    (undecodable) and rejected casts."""
    bodies: list[bytes] = []
    expect_reply: set[str] = set()
    drops = casts = 0

    def addressed(inner: dict[str, Any]) -> dict[str, Any]:
        msg_id = uuid.uuid4().hex
        expect_reply.add(msg_id)
        return {**inner, "_msg_id": msg_id, "_reply_q": reply_q}

    good = {"method": "add", "namespace": "calc", "version": "1.1"}
    makers = [
        lambda: b"\x80\x81 this is not json {",
        lambda: b'["json", "but", "not", "an", "object"]',
        lambda: json.dumps(addressed({"args": {}})).encode(),  # bare JSON, no envelope, no method
        lambda: envelope(addressed({**good, "args": {"a": 1, "b": 2}}), version="3.0"),
        lambda: envelope({**good, "args": {"a": 1, "b": 2}}, version="3.0"),  # unaddressable
        lambda: envelope(addressed({"namespace": "calc", "args": {"a": 1}})),  # no method
        lambda: envelope(addressed({**good, "namespace": "nope", "args": {}})),
        lambda: envelope(addressed({**good, "method": "subtract", "args": {}})),
        lambda: envelope(addressed({**good, "version": "2.0", "args": {"a": 1, "b": 2}})),
        lambda: envelope(addressed({**good, "args": {"a": 1, "b": "two"}})),  # wrong types
        lambda: envelope(addressed({**good, "args": {"a": 1, "c": 3}})),  # wrong names
        lambda: envelope(addressed({**good, "args": [1, 2]})),  # args not an object
        lambda: envelope(addressed({**good, "method": "_x", "args": {}})),
        lambda: envelope(addressed({**good, "method": "__class__", "args": {}})),
        lambda: envelope(addressed({**good, "method": "unexposed", "args": {}})),
        lambda: envelope({**good, "method": "subtract", "args": {}}),  # a cast nobody can serve
    ]
    undecodable = {0, 1, 4}
    for i in range(998):
        kind = i % len(makers)
        bodies.append(makers[kind]())
        drops += kind in undecodable
        casts += kind == len(makers) - 1
    # Two 10 MB bodies, over max_message_bytes (8 MiB), refused unread: one garbage (dropped),
    # one addressed (answered with MessageTooLarge, its address found without decoding).
    bodies.append(b"x" * TEN_MB)
    drops += 1
    bodies.append(envelope(addressed({**good, "method": "nope", "args": {"blob": "y" * TEN_MB}})))
    return bodies, expect_reply, drops, casts


@pytest.fixture
async def transports(
    amqp_url: str, control_exchange: str, janitor: BrokerJanitor
) -> AsyncIterator[tuple[Transport, Transport]]:
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with get_transport(config) as server_t, get_transport(config) as client_t:
        yield server_t, client_t
    janitor.queues.add(client_t.replies.queue_name)


async def test_1000_bad_messages_get_error_replies_or_logged_drops_and_server_survives(
    amqp_url: str,
    control_exchange: str,
    unique_topic: str,
    janitor: BrokerJanitor,
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    janitor.server_topology(control_exchange, unique_topic, "s1")
    server = RPCServer(server_t, Target(topic=unique_topic, server="s1"), [Calculator()])
    await server.start()
    try:
        connection = await aio_pika.connect(amqp_url.replace("rabbit://", "amqp://"))
        async with connection:
            channel = await connection.channel()
            # An oslo-style reply queue: servers answer only queues named like reply queues.
            reply_queue = await channel.declare_queue(
                f"reply_{uuid.uuid4().hex}", exclusive=True, auto_delete=True
            )
            replies: dict[str, dict[str, Any]] = {}

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                assert message.content_type == "application/json"
                outer = json.loads(message.body)
                inner = json.loads(outer["oslo.message"])
                replies[inner["_msg_id"]] = inner

            await reply_queue.consume(on_reply, no_ack=True)
            bodies, expect_reply, drops, casts = bad_messages(reply_queue.name)
            assert len(bodies) == 1000

            with capture_logs() as logs:
                for body in bodies:
                    await channel.default_exchange.publish(
                        aio_pika.Message(body, content_type="application/json"),
                        routing_key=unique_topic,
                    )
                await eventually(lambda: set(replies) == expect_reply, 40, interval=0.1)
                await eventually(
                    lambda: sum(server.stats()["dropped"].values()) >= drops, 10, interval=0.1
                )

            assert all(
                r["failure"] and r["ending"] is True and r["result"] is None
                for r in replies.values()
            )
            failure_classes = {json.loads(r["failure"])["class"] for r in replies.values()}
            assert failure_classes == {
                "MalformedMessage",
                "UnsupportedEnvelopeVersion",
                "UnsupportedVersion",
                "NoSuchMethod",
                "TypeError",
                "MessageTooLarge",
            }
            logged_drops = [
                e
                for e in logs
                if e["event"] == "rpc_message_dropped"
                or (e["event"] == "rpc_message_refused" and not e["replied"])
            ]
            rejected_casts = [e for e in logs if e["event"] == "rpc_request_rejected" and e["cast"]]
            assert len(logged_drops) == drops
            assert len(rejected_casts) == casts
            assert server.running

            # No message is left ready or unacknowledged on the server's queue.
            if shutil.which("rabbitmqctl"):
                assert await queue_counts_ctl(unique_topic, vhost_of(amqp_url)) == (0, 0)

        # The server still serves good calls.
        client = RPCClient(
            client_t, Target(topic=unique_topic, namespace="calc", version="1.2"), timeout=5
        )
        assert await client.call(None, "add", a=2, b=3) == 5
    finally:
        await server.stop(grace=5)
    # After the consumer is gone, nothing came back to the queue (no unacked message requeued).
    assert await ready_count(amqp_url, unique_topic) == 0
