"""Issue 11 on the real RabbitMQ, with per-host broker logins: forged replies are ignored, reply
queues are exclusive and carry the login (also when a stale connection still holds one), and ids
come from ``secrets`` (requests: ``test_rpc_security_requests.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import pytest
from rpc_security_parties import HEX32, Conductor, MakeTransport, ignore_delivery, three_parties
from structlog.testing import capture_logs

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    codec,
    get_transport,
    ids,
)
from shared_objects.runtime.messaging.topology import REPLY_EXCHANGE
from shared_objects.testing import ProxyMode, TcpProxy
from shared_objects.testing.broker import BrokerJanitor, vhost_path
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.eventually import eventually
from shared_objects.testing.forged import replies_only_from, reply_body

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_forged_reply_from_another_login_is_ignored_and_the_genuine_one_returned(
    logins: BrokerLogins,
    transport_as: MakeTransport,
    amqp_url_for: Callable[[str], str],
    control_exchange: str,
    janitor: BrokerJanitor,
) -> None:
    conductor, host1, host2 = three_parties(logins)
    janitor.server_topology(control_exchange, "conductor", "c1")
    endpoint = Conductor()
    endpoint.release.clear()
    async with transport_as(conductor) as conductor_t, transport_as(host1) as host_t:
        async with RPCServer(conductor_t, Target(topic="conductor", server="c1"), [endpoint]):
            client = RPCClient(
                host_t,
                Target(topic="conductor"),
                timeout=15,
                reply_from=replies_only_from(conductor),
            )
            call = asyncio.create_task(client.call(None, "echo", value="genuine"))
            await eventually(lambda: bool(endpoint.calls), 10.0, interval=0.02)
            (msg_id,) = host_t.replies._waiters
            reply_q = host_t.replies.queue_name

            # compute-2 knows the queue and the msg_id. The default exchange is closed to it;
            # the reply exchange is open (an agent answers its live-migration peers there).
            forger = await aio_pika.connect(amqp_url_for(host2))
            async with forger:
                closed = await forger.channel(publisher_confirms=True)
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await closed.default_exchange.publish(
                        aio_pika.Message(reply_body(msg_id, "forged"), user_id=host2),
                        routing_key=reply_q,
                    )
                channel = await forger.channel()
                replies = await channel.get_exchange(REPLY_EXCHANGE.name, ensure=False)
                with capture_logs() as logs:
                    for message in (
                        aio_pika.Message(reply_body(msg_id, "forged"), user_id=host2),
                        aio_pika.Message(reply_body(msg_id, "forged, no user_id")),
                        aio_pika.Message(reply_body(msg_id, None, ending=False)),
                    ):
                        await replies.publish(message, routing_key=reply_q)
                    await eventually(
                        lambda: host_t.stats()["forged_replies"] == 3, 10.0, interval=0.02
                    )
                # Claiming the conductor's login is refused by the broker itself.
                spoof = await forger.channel()
                spoof_replies = await spoof.get_exchange(REPLY_EXCHANGE.name, ensure=False)
                with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                    await spoof_replies.publish(
                        aio_pika.Message(reply_body(msg_id, "spoofed"), user_id=conductor),
                        routing_key=reply_q,
                    )
            await asyncio.sleep(0.2)  # an absence check: a forged reply taken would end the call
            assert not call.done()
            endpoint.release.set()
            result = await call
    assert result == {"value": "genuine", "caller": host1, "is_admin": False}
    refused = [e for e in logs if e["event"] == "reply_refused"]
    assert [(e["log_level"], e["msg_id"], e["login"]) for e in refused] == [
        ("warning", msg_id, host2),
        ("warning", msg_id, None),
        ("warning", msg_id, None),
    ]
    assert host_t.pending_replies == 0


async def test_reply_queue_carries_the_login_and_no_other_connection_can_consume_it(
    logins: BrokerLogins,
    transport_as: MakeTransport,
    amqp_url_for: Callable[[str], str],
    amqp_url: str,
    control_exchange: str,
    janitor: BrokerJanitor,
) -> None:
    conductor, host1, host2 = three_parties(logins)
    janitor.server_topology(control_exchange, "conductor", "c1")
    async with transport_as(conductor) as conductor_t, transport_as(host1) as host_t:
        async with RPCServer(conductor_t, Target(topic="conductor", server="c1"), [Conductor()]):
            client = RPCClient(host_t, Target(topic="conductor"), timeout=10)
            await client.call(None, "echo", value=1)
            name = host_t.replies.queue_name
            assert re.fullmatch(rf"reply_{re.escape(host1)}_{HEX32}", name), name

            # The same login from another connection: the queue is exclusive (405). Another
            # host: its permissions do not even reach the queue (403). The broker admin: 405.
            expected = {
                host1: aiormq.exceptions.ChannelLockedResource,
                host2: aiormq.exceptions.ChannelAccessRefused,
                "guest": aiormq.exceptions.ChannelLockedResource,
            }
            admin_url = amqp_url.replace("rabbit", "amqp", 1)
            for login, error in expected.items():
                url = amqp_url_for(login) if login != "guest" else admin_url
                connection = await aiormq.connect(url)
                try:
                    channel = await connection.channel()
                    with pytest.raises(error):
                        await channel.basic_consume(name, ignore_delivery, no_ack=True)
                finally:
                    await connection.close()
            # Still ours, still working.
            assert (await client.call(None, "echo", value=2))["value"] == 2


async def test_ids_on_the_wire_come_from_secrets(
    amqp_url: str,
    control_exchange: str,
    unique_topic: str,
    janitor: BrokerJanitor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []
    real_token_hex = secrets.token_hex

    def recording_token_hex(nbytes: int) -> str:
        value = real_token_hex(nbytes)
        made.append(value)
        return value

    monkeypatch.setattr(ids.secrets, "token_hex", recording_token_hex)
    janitor.exchanges.add(control_exchange)
    spy_q = f"spy-{unique_topic}"
    janitor.queues.add(spy_q)
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with get_transport(config) as transport:
        connection = await aio_pika.connect(amqp_url.replace("rabbit", "amqp"))
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(control_exchange, "topic")
            queue = await channel.declare_queue(spy_q)
            await queue.bind(exchange, routing_key=unique_topic)
            seen: list[dict[str, Any]] = []
            user_ids: list[str | None] = []

            async def spy(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                seen.append(codec.decode_message(message.body))
                user_ids.append(message.user_id)

            await queue.consume(spy, no_ack=True)  # calls expire after their timeout
            client = RPCClient(transport, Target(topic=unique_topic), timeout=0.5)
            for _ in range(3):
                with pytest.raises(MessagingTimeout):
                    await client.call(None, "anything")
            await eventually(lambda: len(seen) == 3, 10.0, interval=0.02)
    assert user_ids == ["guest"] * 3
    for request in seen:
        assert request["_msg_id"] in made and request["_unique_id"] in made
    assert len({r["_msg_id"] for r in seen} | {r["_unique_id"] for r in seen}) == 6
    assert transport.replies.queue_name.rpartition("_")[2] in made


async def test_reply_queue_held_by_a_stale_connection_is_retried_until_free(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    """After a reconnect the broker may still give the exclusive reply queue to our previous,
    half-dead connection. The rest of the transport must come back at once and the reply queue
    as soon as the broker lets go. A stand-in connection plays the stale one, deterministically:
    it takes the queue while the proxy keeps our client from reconnecting."""
    other = f"{unique_topic}-b"
    janitor.server_topology(control_exchange, unique_topic, "s1")
    janitor.server_topology(control_exchange, other, "s1")
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with TcpProxy(5672) as proxy:
        proxied = MessagingConfig(
            transport_url=proxy.url(vhost=vhost_path(amqp_url)), control_exchange=control_exchange
        )
        async with (
            get_transport(config) as server_t,
            get_transport(proxied, reconnect_interval=0.3) as client_t,
            RPCServer(server_t, Target(topic=unique_topic, server="s1"), [Conductor()]),
            # The proxied transport serves too: its publisher must not wait for the reply queue.
            RPCServer(client_t, Target(topic=other, server="s1"), [Conductor()]),
        ):
            client = RPCClient(client_t, Target(topic=unique_topic), timeout=2)
            assert (await client.call(None, "echo", value=0))["value"] == 0
            name, spec = client_t.replies.queue_name, client_t.replies.spec

            with capture_logs() as logs:
                proxy.set_mode(ProxyMode.RESET)  # our connection dies; the broker drops it
                holder = await aio_pika.connect(amqp_url.replace("rabbit", "amqp"))
                try:
                    channel = await holder.channel()
                    deadline = time.monotonic() + 10
                    while True:  # the broker deletes the queue with our connection
                        try:
                            await channel.declare_queue(
                                name, exclusive=True, arguments=spec.arguments_dict
                            )
                            break
                        except aiormq.exceptions.ChannelLockedResource:
                            assert time.monotonic() < deadline
                            channel = await holder.channel()
                            await asyncio.sleep(0.05)
                    proxy.heal()
                    await eventually(lambda: client_t.stats()["reconnects"] >= 1, 15, interval=0.02)
                    await eventually(
                        lambda: any(e["event"] == "consumer_recovery_failed" for e in logs),
                        10.0,
                        interval=0.02,
                    )
                    # Publishing and serving work meanwhile; our own calls cannot get replies.
                    server_side = RPCClient(server_t, Target(topic=other), timeout=5)
                    assert (await server_side.call(None, "echo", value="b"))["value"] == "b"
                    with pytest.raises(MessagingTimeout):
                        await client.prepare(timeout=1).call(None, "echo", value=1)
                finally:
                    await holder.close()  # the stale connection goes: the queue is free
                started = time.monotonic()
                while True:
                    with contextlib.suppress(MessagingTimeout):
                        await client.prepare(timeout=1).call(None, "echo", value=2)
                        break
                    assert time.monotonic() - started < 10, "reply queue never came back"
            assert client_t.replies.queue_name == name
            assert any(e["event"] == "consumer_recovered" and e["queue"] == name for e in logs)
            results = await asyncio.gather(*(client.call(None, "echo", value=i) for i in range(20)))
            assert [r["value"] for r in results] == list(range(20))
