"""Graceful stop on the real broker: in-flight handlers finish, requests not yet started go back
to the queue for another server, none runs twice, none is lost."""

from __future__ import annotations

import asyncio

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import RPCClient, RPCServer, Target, expose, get_transport
from shared_objects.testing.broker import BrokerJanitor
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Worker:
    def __init__(self) -> None:
        self.done: list[int] = []

    @expose
    async def work(self, ctxt: RequestContext, i: int) -> int:
        await asyncio.sleep(0.2)  # a handler still running when stop() comes
        self.done.append(i)
        return i


async def test_stop_finishes_in_flight_and_requeues_the_rest(
    amqp_url: str, control_exchange: str, unique_topic: str, janitor: BrokerJanitor
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1", "s2")
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    async with get_transport(config) as server_t, get_transport(config) as client_t:
        first, second = Worker(), Worker()
        server = RPCServer(
            server_t, Target(topic=unique_topic, server="s1"), [first], max_concurrency=2
        )
        await server.start()
        client = RPCClient(client_t, Target(topic=unique_topic), timeout=10)
        calls = [asyncio.create_task(client.call(None, "work", i=i)) for i in range(10)]
        await eventually(lambda: server.in_flight >= 2, 5, interval=0.01)
        await server.stop(grace=5)
        assert len(first.done) == 2  # the two running finished; the waiting ones were not run
        async with RPCServer(server_t, Target(topic=unique_topic, server="s2"), [second]):
            results = await asyncio.gather(*calls)
        assert sorted(results) == list(range(10))
        assert sorted(first.done + second.done) == list(range(10))  # each exactly once
        assert len(second.done) == 8
