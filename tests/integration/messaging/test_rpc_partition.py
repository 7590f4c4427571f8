"""A silent network partition between client and broker (TCP proxy blackhole on loopback):
calls and casts fail within their timeouts with clear errors, never hang, and work after heal."""

from __future__ import annotations

import time

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessageDeliveryFailure,
    MessagingError,
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.testing import TcpProxy
from shared_objects.testing.broker import BrokerJanitor, vhost_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Ping:
    @expose
    async def ping(self, ctxt: RequestContext) -> str:
        return "pong"


async def test_blackholed_client_gets_bounded_errors_and_recovers(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    server_config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with TcpProxy(5672) as proxy:
        client_config = MessagingConfig(
            transport_url=proxy.url(vhost=vhost_path(amqp_url)),
            control_exchange=control_exchange,
            heartbeat=4,
        )
        async with (
            get_transport(server_config) as server_t,
            get_transport(client_config) as client_t,
            RPCServer(server_t, Target(topic=unique_topic, server="s1"), [Ping()]),
        ):
            client = RPCClient(client_t, Target(topic=unique_topic), timeout=1.0)
            assert await client.call(None, "ping") == "pong"

            proxy.blackhole()
            start = time.monotonic()
            with pytest.raises(MessagingTimeout):
                await client.call(None, "ping")
            assert time.monotonic() - start < 1.5
            start = time.monotonic()
            # A cast has no reply to wait for: its publish (confirm) is what is bounded.
            with pytest.raises(MessageDeliveryFailure):
                await client.cast(None, "ping")
            assert time.monotonic() - start < 1.5
            assert client_t.pending_replies == 0

            proxy.heal()
            deadline = time.monotonic() + 40
            while True:
                try:
                    assert await client.prepare(timeout=2.0).call(None, "ping") == "pong"
                    break
                except MessagingError:
                    assert time.monotonic() < deadline, "client did not recover after heal"
            assert client_t.pending_replies == 0


async def test_stop_and_close_do_not_wait_for_a_broker_that_is_gone(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    proxy = TcpProxy(5672)
    await proxy.start()
    config = MessagingConfig(
        transport_url=proxy.url(vhost=vhost_path(amqp_url)), control_exchange=control_exchange
    )
    transport = get_transport(config)
    await transport.connect()
    server = RPCServer(transport, Target(topic=unique_topic, server="s1"), [Ping()])
    await server.start()
    assert (
        await RPCClient(transport, Target(topic=unique_topic), timeout=5).call(None, "ping")
        == "pong"
    )
    # The broker disappears for good: connections cut, nothing listening any more.
    proxy.reset()
    await proxy.stop()
    start = time.monotonic()
    await server.stop(grace=1)
    await transport.close()
    assert time.monotonic() - start < 3
