"""Per-process broker logins (shared_objects/testing/broker_logins/) on a real RabbitMQ.

The broker enforces what Fleet relies on: each login sees only its own queues, publishes only
where its role may, and cannot put another login's name in ``user_id``. Every test uses its own
tagged BrokerLogins on the session's vhost and deletes its users at the end.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    Notifier,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.broker_probe import channel_outcome, ignore_message
from shared_objects.testing.rabbit_node import RabbitNode, RabbitNodeError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl"),
]

HOST, OTHER = "compute-1", "compute-2"


@pytest.fixture
async def logins(
    amqp_url: str, amqp_vhost: str, control_exchange: str
) -> AsyncIterator[BrokerLogins]:
    if not amqp_vhost:
        pytest.skip("needs a private vhost (rabbitmqctl on the shared broker)")
    logins = BrokerLogins(
        amqp_url,
        amqp_vhost,
        tag=uuid.uuid4().hex[:6],
        legacy_queue_names=False,
        agent_topic_queue=False,
    )
    await logins.ensure(
        conductors=["1"], operators=[""], hosts=[HOST, OTHER], exchanges=[control_exchange]
    )
    try:
        yield logins
    finally:
        await logins.delete()


async def _connect(url: str) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(parse_transport_url(url).hosts[0], timeout=10)


def _hex() -> str:
    return secrets.token_hex(16)


async def test_one_batch_creates_many_logins_quickly(amqp_url: str, amqp_vhost: str) -> None:
    if not amqp_vhost:
        pytest.skip("needs a private vhost")
    logins = BrokerLogins(amqp_url, amqp_vhost, tag=uuid.uuid4().hex[:6])
    hosts = [f"batch-{i}" for i in range(40)]
    started = time.monotonic()
    try:
        await logins.ensure(conductors=["1", "2"], operators=[""], hosts=hosts, exchanges=["x"])
        took = time.monotonic() - started
        assert logins.batches == 1
        # Nothing changed: no second broker call.
        await logins.ensure(hosts=hosts[:5], exchanges=["x"])
        assert logins.batches == 1
        print(f"43 logins with permissions and topic permissions in one batch: {took:.2f}s")
        assert took < 15, took
        url = logins.url_for(logins.host_login("batch-7"))
        connection = await _connect(url)
        await connection.close()
    finally:
        started = time.monotonic()
        await logins.delete()
        print(f"deleted in {time.monotonic() - started:.2f}s")
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await _connect(url)


async def test_agent_login_reaches_only_its_own_queues(
    logins: BrokerLogins, control_exchange: str
) -> None:
    login = logins.host_login(HOST)
    other = logins.host_login(OTHER)
    connection = await _connect(logins.url_for(login))
    try:

        async def exchange(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractExchange:
            return await channel.declare_exchange(control_exchange, aio_pika.ExchangeType.TOPIC)

        async def own_server_queue(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(f"compute.{HOST}")
            await queue.bind(await exchange(channel), routing_key=f"compute.{HOST}")
            await queue.consume(ignore_message)

        async def own_reply_queue(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(f"reply_{login}_{_hex()}", exclusive=True)
            await queue.consume(ignore_message)

        async def own_fanout_queue(channel: aio_pika.abc.AbstractChannel) -> None:
            fanout = await channel.declare_exchange(
                "compute_fanout", aio_pika.ExchangeType.FANOUT, auto_delete=True
            )
            queue = await channel.declare_queue(f"compute_fanout_{HOST}_{_hex()}")
            await queue.bind(fanout)
            await queue.delete(if_unused=False, if_empty=False)

        async def publish(key: str, channel: aio_pika.abc.AbstractChannel) -> None:
            await (await exchange(channel)).publish(aio_pika.Message(b"{}"), routing_key=key)

        assert await channel_outcome(connection, own_server_queue) == "ok"
        assert await channel_outcome(connection, own_reply_queue) == "ok"
        assert await channel_outcome(connection, own_fanout_queue) == "ok"
        # Calls to the conductor, to a peer agent (live migration) and notifications.
        for key in ("conductor", f"compute.{OTHER}", "versioned_notifications.info"):
            assert await channel_outcome(connection, functools.partial(publish, key)) == "ok", key

        # Everything else is refused by the broker.
        async def consume(name: str, channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(name, passive=True)
            await queue.consume(ignore_message)

        conductor_conn = await _connect(logins.url_for(logins.conductor_login("1")))
        try:
            victim_reply = f"reply_{other}_{_hex()}"
            setup = await conductor_conn.channel()
            await setup.declare_queue("conductor")
            await setup.declare_queue(f"compute.{OTHER}")
            await setup.declare_queue(victim_reply)
            for name in ("conductor", f"compute.{OTHER}", victim_reply):
                got = await channel_outcome(connection, functools.partial(consume, name))
                assert got == "ACCESS_REFUSED", name
            await setup.queue_delete(victim_reply)
        finally:
            await conductor_conn.close()

        async def declare(name: str, channel: aio_pika.abc.AbstractChannel) -> None:
            await channel.declare_queue(name)

        for name in ("conductor", f"compute.{OTHER}", f"reply_{other}_{_hex()}", "compute"):
            assert await channel_outcome(connection, functools.partial(declare, name)) == (
                "ACCESS_REFUSED"
            ), name

        async def snoop(channel: aio_pika.abc.AbstractChannel) -> None:
            # Its own queue, bound to the conductor's routing key: refused (topic read).
            queue = await channel.declare_queue(f"compute.{HOST}")
            await queue.bind(await exchange(channel), routing_key="conductor")

        assert await channel_outcome(connection, snoop) == "ACCESS_REFUSED"
        # Publishing outside its routing keys: refused (topic write).
        assert await channel_outcome(connection, lambda ch: publish("not-a-topic", ch)) == (
            "ACCESS_REFUSED"
        )
    finally:
        await connection.close()


async def test_user_id_spoofing_is_refused_by_the_broker(
    logins: BrokerLogins, control_exchange: str
) -> None:
    connection = await _connect(logins.url_for(logins.host_login(HOST)))
    try:

        async def send(user_id: str, channel: aio_pika.abc.AbstractChannel) -> None:
            exchange = await channel.declare_exchange(control_exchange, aio_pika.ExchangeType.TOPIC)
            await exchange.publish(
                aio_pika.Message(b"{}", user_id=user_id), routing_key="conductor"
            )

        own = logins.host_login(HOST)
        assert await channel_outcome(connection, lambda ch: send(own, ch)) == "ok"
        for forged in (logins.conductor_login("1"), logins.host_login(OTHER), "guest"):
            got = await channel_outcome(connection, functools.partial(send, forged))
            assert got == "PRECONDITION_FAILED", forged
    finally:
        await connection.close()


async def test_operator_login_calls_the_conductor_and_nothing_else(
    logins: BrokerLogins, control_exchange: str
) -> None:
    login = logins.operator_login()
    connection = await _connect(logins.url_for(login))
    try:

        async def publish(key: str, channel: aio_pika.abc.AbstractChannel) -> None:
            exchange = await channel.declare_exchange(control_exchange, aio_pika.ExchangeType.TOPIC)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key=key)

        async def reply_queue(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(f"reply_{login}_{_hex()}", exclusive=True)
            await queue.consume(ignore_message)

        async def declare(name: str, channel: aio_pika.abc.AbstractChannel) -> None:
            await channel.declare_queue(name)

        assert await channel_outcome(connection, lambda ch: publish("conductor", ch)) == "ok"
        assert await channel_outcome(connection, reply_queue) == "ok"
        assert await channel_outcome(connection, lambda ch: publish(f"compute.{HOST}", ch)) == (
            "ACCESS_REFUSED"
        )
        for name in (f"compute.{HOST}", "conductor"):
            assert await channel_outcome(connection, functools.partial(declare, name)) == (
                "ACCESS_REFUSED"
            ), name
    finally:
        await connection.close()


class _Echo:
    @expose
    async def whoami(self, ctxt: RequestContext) -> str | None:
        return ctxt.caller


async def test_the_rpc_runtime_works_under_the_agent_and_operator_permissions(
    logins: BrokerLogins, control_exchange: str
) -> None:
    """The real runtime, not hand-made declarations: an agent-shaped server on ``compute.X``
    with a notifier, called by a conductor; the agent and an operator call the conductor."""

    def cfg(login: str) -> MessagingConfig:
        return MessagingConfig(
            transport_url=logins.url_for(login), control_exchange=control_exchange
        )

    agent_login = logins.host_login(HOST)
    conductor_login = logins.conductor_login("1")
    server_kwargs: dict[str, Any] = (
        {"listen_on_topic": False} if _supports_listen_on_topic() else {}
    )
    async with (
        get_transport(cfg(agent_login)) as agent_t,
        get_transport(cfg(conductor_login)) as conductor_t,
        get_transport(cfg(logins.operator_login())) as operator_t,
        RPCServer(agent_t, Target(topic="compute", server=HOST), [_Echo()], **server_kwargs),
        RPCServer(conductor_t, Target(topic="conductor", server="c1"), [_Echo()]),
    ):
        to_agent = RPCClient(conductor_t, Target(topic="compute", server=HOST), timeout=10)
        assert await to_agent.call(RequestContext(), "whoami") == conductor_login
        for transport, login in ((agent_t, agent_login), (operator_t, logins.operator_login())):
            client = RPCClient(transport, Target(topic="conductor"), timeout=10)
            assert await client.call(RequestContext(), "whoami") == login
        notifier = Notifier(agent_t, f"compute.{HOST}", topics=("versioned_notifications",))
        await notifier.info(RequestContext(), "instance.create.end", {"x": 1})


def _supports_listen_on_topic() -> bool:
    import inspect

    return "listen_on_topic" in inspect.signature(RPCServer.__init__).parameters


async def test_private_rabbit_node_gets_logins_through_its_own_ctl() -> None:
    try:
        node = RabbitNode()
        await node.start()
    except Exception as exc:  # no rabbitmq-server scripts on this machine
        pytest.skip(f"no private RabbitMQ node: {exc}")
    try:
        logins = BrokerLogins.for_node(node, tag="node1", legacy_queue_names=False)
        await logins.ensure(hosts=[HOST], operators=[""], exchanges=["fleet"])
        connection = await _connect(logins.url_for(logins.host_login(HOST)))
        try:
            assert (
                await channel_outcome(connection, lambda ch: ch.declare_queue(f"compute.{HOST}"))
                == "ok"
            )
            assert await channel_outcome(connection, lambda ch: ch.declare_queue("conductor")) == (
                "ACCESS_REFUSED"
            )
        finally:
            await connection.close()
        await logins.delete()
        with pytest.raises(RabbitNodeError):
            await node.ctl("authenticate_user", logins.host_login(HOST), "x")
    finally:
        await node.stop()


async def test_delete_is_idempotent_and_skips_users_already_gone(
    logins: BrokerLogins,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        "delete_user",
        logins.host_login(OTHER),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()
    await logins.delete()
    await logins.delete()
