"""Timeouts over the real RabbitMQ (acceptance b): bounded waits, late replies dropped and logged,
no leaked futures, request expiration, call-monitor heartbeats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    expose,
    get_transport,
)
from shared_objects.testing.broker import BrokerJanitor, ready_count
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Slow:
    @expose
    async def sleep(self, ctxt: RequestContext, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"


@pytest.fixture
def config(amqp_url: str, control_exchange: str) -> MessagingConfig:
    return MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)


@pytest.fixture
async def transport(config: MessagingConfig, janitor: BrokerJanitor) -> AsyncIterator[Transport]:
    async with get_transport(config) as transport:
        yield transport
    janitor.queues.add(transport.replies.queue_name)


async def test_call_nobody_answers_times_out_in_time_and_request_expires(
    transport: Transport,
    janitor: BrokerJanitor,
    control_exchange: str,
    unique_topic: str,
    amqp_url: str,
) -> None:
    # A topic queue exists but nothing consumes it: the server "never answers".
    janitor.server_topology(control_exchange, unique_topic)
    topology = transport.topology
    await transport.driver.declare(
        [topology.topic_queue(topology.control_exchange(), unique_topic)]
    )
    client = RPCClient(transport, Target(topic=unique_topic), timeout=1.0)
    start = time.monotonic()
    with pytest.raises(MessagingTimeout) as info:
        await client.call(None, "anything", x=1)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 1.5
    assert (
        "'anything'" in str(info.value)
        and unique_topic in str(info.value)
        and "1.0s" in str(info.value)
    )
    assert transport.pending_replies == 0

    # The request carried expiration = timeout, so the broker drops it instead of a late run.
    async def dropped() -> bool:
        return await ready_count(amqp_url, unique_topic) == 0

    await eventually(dropped, 5, interval=0.2, what="the expired request dropped")


async def test_late_reply_is_dropped_and_logged_and_nothing_leaks(
    config: MessagingConfig,
    transport: Transport,
    janitor: BrokerJanitor,
    control_exchange: str,
    unique_topic: str,
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with (
        get_transport(config) as server_transport,
        RPCServer(server_transport, Target(topic=unique_topic, server="s1"), [Slow()]),
    ):
        client = RPCClient(transport, Target(topic=unique_topic), timeout=0.5)
        with capture_logs() as logs:
            start = time.monotonic()
            results = await asyncio.gather(
                *[client.call(None, "sleep", seconds=1.0) for _ in range(5)], return_exceptions=True
            )
            assert time.monotonic() - start < 1.0
            assert all(isinstance(r, MessagingTimeout) for r in results)
            assert transport.pending_replies == 0 and client.pending_count == 0
            await eventually(lambda: transport.stats()["late_replies"] >= 5, 5)
        dropped = [e for e in logs if e["event"] == "late_reply_dropped"]
        assert len(dropped) == 5
        assert all(e["log_level"] == "info" and e["msg_id"] for e in dropped)
        # The transport still works after the timeouts.
        assert await client.prepare(timeout=5).call(None, "sleep", seconds=0) == "done"
        assert transport.pending_replies == 0


async def test_call_monitor_heartbeats_keep_long_call_alive(
    config: MessagingConfig,
    transport: Transport,
    janitor: BrokerJanitor,
    control_exchange: str,
    unique_topic: str,
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    async with (
        get_transport(config) as server_transport,
        RPCServer(server_transport, Target(topic=unique_topic, server="s1"), [Slow()]),
    ):
        client = RPCClient(
            transport, Target(topic=unique_topic), timeout=10, call_monitor_timeout=2
        )
        assert await client.call(None, "sleep", seconds=2.6) == "done"
