"""Issue 11 on the real RabbitMQ, with per-host broker logins: requests without a
broker-validated user_id are refused, the authorizer refuses before anything runs, and agents
stay off the shared topic queue.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import aio_pika
import aiormq
import pytest
from rpc_security_parties import HEX32, Conductor, LoginPolicy, MakeTransport, three_parties
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingError,
    RPCClient,
    RPCServer,
    Target,
    codec,
    get_transport,
)
from shared_objects.runtime.messaging.exceptions import RequestRefused, UncoveredMethods
from shared_objects.testing.broker import BrokerJanitor
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.eventually import eventually
from shared_objects.testing.forged import replies_only_from

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_request_without_user_id_is_refused_with_an_error_reply(
    logins: BrokerLogins,
    transport_as: MakeTransport,
    amqp_url: str,
    control_exchange: str,
    janitor: BrokerJanitor,
) -> None:
    janitor.server_topology(control_exchange, "conductor", "c1")
    endpoint = Conductor()
    async with transport_as(logins.conductor_login("1")) as conductor_t:
        server = RPCServer(
            conductor_t, Target(topic="conductor", server="c1"), [endpoint], require_user_id=True
        )
        async with server:
            connection = await aio_pika.connect(amqp_url.replace("rabbit", "amqp"))
            async with connection:
                channel = await connection.channel()
                replies: dict[str, dict[str, Any]] = {}
                # oslo-style: servers answer only queues named like reply queues
                reply_q = await channel.declare_queue(f"reply_{uuid.uuid4().hex}", exclusive=True)

                async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                    body = codec.decode_message(message.body)
                    replies[body["_msg_id"]] = body

                await reply_q.consume(on_reply, no_ack=True)
                exchange = await channel.get_exchange(control_exchange, ensure=False)

                def request(msg_id: str | None, value: str) -> bytes:
                    inner: dict[str, Any] = {"method": "echo", "args": {"value": value}}
                    if msg_id is not None:
                        inner.update(_msg_id=msg_id, _reply_q=reply_q.name)
                    return codec.encode_message(inner)

                with capture_logs() as logs:
                    # Like an oslo.messaging publisher: no user_id property at all.
                    await exchange.publish(
                        aio_pika.Message(request("anon", "x")), routing_key="conductor"
                    )
                    await exchange.publish(
                        aio_pika.Message(request(None, "cast")), routing_key="conductor"
                    )
                    # The same with the broker-validated login set.
                    await exchange.publish(
                        aio_pika.Message(request("authed", "y"), user_id="guest"),
                        routing_key="conductor",
                    )
                    await eventually(lambda: len(replies) == 2, 10.0, interval=0.02)
                    await eventually(
                        lambda: server.stats()["dropped"].get("no_user_id") == 2,
                        10.0,
                        interval=0.02,
                    )
    anon = replies["anon"]
    failure = json.loads(anon["failure"])
    assert (failure["class"], failure["module"]) == (
        "Unauthenticated",
        "shared_objects.messaging.exceptions",
    )
    assert "no broker-validated user_id" in failure["message"]
    assert replies["authed"]["result"]["value"] == "y"
    assert endpoint.calls == [("echo", "y", "guest")]
    refused = [e for e in logs if e["event"] == "rpc_request_refused"]
    assert [(e["log_level"], e["reason"], e["queue"]) for e in refused] == [
        ("warning", "no_user_id", "conductor")
    ] * 2


async def test_authorizer_refusal_returns_the_error_and_changes_nothing(
    logins: BrokerLogins,
    transport_as: MakeTransport,
    control_exchange: str,
    janitor: BrokerJanitor,
) -> None:
    conductor, host1, host2 = three_parties(logins)
    janitor.server_topology(control_exchange, "conductor", "c1")
    endpoint = Conductor()
    policy = LoginPolicy({"echo": {host1, host2}, "delete_everything": {conductor}})
    async with transport_as(conductor) as conductor_t, transport_as(host2) as host_t:
        server = RPCServer(
            conductor_t,
            Target(topic="conductor", server="c1"),
            [endpoint],
            authorizer=policy,
            require_user_id=True,
        )
        async with server:
            client = RPCClient(
                host_t,
                Target(topic="conductor"),
                timeout=10,
                reply_from=replies_only_from(conductor),
            )
            with pytest.raises(RequestRefused, match="may not call delete_everything"):
                await client.call(None, "delete_everything")
            # A wire context claiming admin rights changes nothing.
            admin = RequestContext(is_admin=True, roles=["admin"])
            with pytest.raises(RequestRefused):
                await client.call(admin, "delete_everything")
            assert endpoint.things == {"a", "b"}
            assert endpoint.calls == []
            assert (await client.call(admin, "echo", value=1)) == {
                "value": 1,
                "caller": host2,
                "is_admin": False,
            }
            assert server.stats()["calls"] == {"delete_everything:forbidden": 2, "echo:ok": 1}
    assert policy.refused == [(host2, "delete_everything")] * 2


async def test_authorizer_that_misses_an_exposed_method_fails_construction(
    amqp_url: str, control_exchange: str
) -> None:
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    transport = get_transport(config)
    with pytest.raises(UncoveredMethods, match="delete_everything"):
        RPCServer(
            transport,
            Target(topic="conductor", server="c1"),
            [Conductor()],
            authorizer=LoginPolicy({"echo": set()}),
        )


async def test_agent_serves_only_its_own_queues_within_its_permissions(
    logins: BrokerLogins,
    transport_as: MakeTransport,
    amqp_url: str,
    control_exchange: str,
    janitor: BrokerJanitor,
) -> None:
    conductor, host1 = logins.conductor_login("1"), logins.host_login("compute-1")
    janitor.server_topology(control_exchange, "compute", "compute-1")
    endpoint = Conductor()
    # The session's vhost is shared with earlier tests (a cluster test's conductor may have
    # left a "compute" queue): start from none, so the check below is about this server.
    connection = await aiormq.connect(amqp_url.replace("rabbit", "amqp"))
    try:
        await (await connection.channel()).queue_delete("compute")
    finally:
        await connection.close()
    async with transport_as(conductor) as conductor_t, transport_as(host1) as host_t:
        server = RPCServer(
            host_t, Target(topic="compute", server="compute-1"), [endpoint], listen_on_topic=False
        )
        async with server:
            fanout = server._fanout_queue
            assert fanout is not None
            assert re.fullmatch(rf"compute_fanout_compute-1_{HEX32}", fanout.name)
            client = RPCClient(
                conductor_t,
                Target(topic="compute"),
                timeout=10,
                reply_from=replies_only_from(host1),
            )
            result = await client.prepare(server="compute-1").call(None, "echo", value=1)
            assert result["caller"] == conductor
            await client.prepare(fanout=True).cast(None, "echo", value="everyone")
            await eventually(
                lambda: ("echo", "everyone", conductor) in endpoint.calls, 10.0, interval=0.02
            )
            # Nobody declared the shared queue: a call to the bare topic goes nowhere.
            connection = await aiormq.connect(amqp_url.replace("rabbit", "amqp"))
            try:
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.queue_declare("compute", passive=True)
            finally:
                await connection.close()
        if not logins.agent_topic_queue:
            # Where agents are not granted the shared queue, consuming it is refused outright.
            with pytest.raises(MessagingError, match="ACCESS_REFUSED"):
                await RPCServer(
                    host_t, Target(topic="compute", server="compute-1"), [endpoint]
                ).start()
