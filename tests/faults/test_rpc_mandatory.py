"""Calls and casts to a server that does not exist fail fast (issue 13, point 2).

Server-addressed calls and casts are published ``mandatory``: RabbitMQ returns a message no
queue is bound for (basic.return, which arrives before the publisher confirm), and the caller
gets ``MessageUndeliverable`` naming the target, well under a second, instead of waiting for its
whole timeout. The same scenarios run on the in-memory driver (unit tests rely on it behaving
the same) and on the real broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessageUndeliverable,
    MessagingError,
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    expose,
    get_transport,
)

pytestmark = [pytest.mark.timeout(60)]

# "Well under a second" for a refused publish; generous for a loaded 2-core machine.
FAST = 1.0
CALL_TIMEOUT = 20.0


class Relay:
    """A conductor-like endpoint whose handler calls an agent, as the conductor's do."""

    def __init__(self, transport: Transport, topic: str) -> None:
        self.transport = transport
        self.topic = topic

    @expose
    async def ping(self, ctxt: RequestContext) -> str:
        return "pong"

    @expose
    async def relay(self, ctxt: RequestContext, host: str) -> str:
        client = RPCClient(
            self.transport, Target(topic=self.topic, server=host), timeout=CALL_TIMEOUT
        )
        try:
            await client.call(ctxt, "ping")
        except MessageUndeliverable as exc:
            return f"undeliverable: {exc}"
        return "delivered"


@pytest.fixture(params=["memory", "rabbit"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Transport, Transport]]:
    """(server-side, client-side) transports on one broker, as two processes would have."""
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        url = f"memory://mandatory-{uuid.uuid4().hex[:8]}"
    else:
        request.applymarker(pytest.mark.integration)
        url = request.getfixturevalue("amqp_url")
    config = MessagingConfig(transport_url=url, control_exchange=exchange)
    async with get_transport(config) as server_side, get_transport(config) as client_side:
        yield server_side, client_side


@pytest.fixture
def topic() -> str:
    return f"compute-{uuid.uuid4().hex[:8]}"


async def _elapsed(coro: Any) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result = await coro
    except MessagingError as exc:
        result = exc
    return result, time.monotonic() - started


async def test_call_to_a_missing_server_fails_fast_naming_the_target(
    pair: tuple[Transport, Transport], topic: str
) -> None:
    server_side, client_side = pair
    # The topic exists (one server runs), but not the host asked for.
    async with RPCServer(
        server_side, Target(topic=topic, server="compute-1"), [Relay(server_side, topic)]
    ):
        client = RPCClient(
            client_side, Target(topic=topic, server="compute-9"), timeout=CALL_TIMEOUT
        )
        error, elapsed = await _elapsed(client.call(RequestContext(), "ping"))
        assert isinstance(error, MessageUndeliverable), repr(error)
        assert elapsed < FAST, elapsed
        text = str(error)
        assert f"{topic}.compute-9" in text and client_side.control_exchange in text, text
        assert "compute-9" in text and "running" in text
        assert client_side.pending_replies == 0
        # The host that exists is still reached, mandatory or not.
        assert await client.prepare(server="compute-1").call(RequestContext(), "ping") == "pong"
        stats = client.stats()["calls"]
        assert stats.get("ping:undeliverable") == 1 and stats.get("ping:ok") == 1, stats


async def test_cast_to_a_missing_server_raises_message_undeliverable(
    pair: tuple[Transport, Transport], topic: str
) -> None:
    _, client_side = pair
    client = RPCClient(client_side, Target(topic=topic, server="compute-9"), timeout=CALL_TIMEOUT)
    error, elapsed = await _elapsed(client.cast(RequestContext(), "run_instance", x=1))
    assert isinstance(error, MessageUndeliverable), repr(error)
    assert elapsed < FAST, elapsed
    assert f"{topic}.compute-9" in str(error)
    # Fanout casts and topic casts stay fire-and-forget: nobody listening is not an error.
    await client.prepare(server=None, fanout=True).cast(RequestContext(), "refresh")
    await client.prepare(server=None).cast(RequestContext(), "refresh")


async def test_calls_to_missing_servers_do_not_hold_a_four_slot_pool(
    pair: tuple[Transport, Transport], topic: str
) -> None:
    server_side, client_side = pair
    conductor_topic = f"conductor-{uuid.uuid4().hex[:8]}"
    relay = Relay(server_side, topic)
    async with RPCServer(
        server_side, Target(topic=conductor_topic, server="c1"), [relay], max_concurrency=4
    ):
        client = RPCClient(client_side, Target(topic=conductor_topic), timeout=CALL_TIMEOUT)
        started = time.monotonic()
        relayed = [
            asyncio.create_task(client.call(RequestContext(), "relay", host=f"ghost-{i}"))
            for i in range(4)
        ]
        await asyncio.sleep(0.05)  # the four take every slot first
        pong, ping_took = await _elapsed(client.call(RequestContext(), "ping"))
        results = await asyncio.gather(*relayed)
        took = time.monotonic() - started
    assert pong == "pong"
    assert all(r.startswith("undeliverable: ") for r in results), results
    assert all(f"{topic}.ghost-" in r for r in results), results
    # Without mandatory each relay would hold its slot for CALL_TIMEOUT (20 s).
    assert took < 2 * FAST and ping_took < 2 * FAST, (took, ping_took)


async def test_topic_call_without_any_server_times_out_saying_why(
    pair: tuple[Transport, Transport], topic: str
) -> None:
    _, client_side = pair
    client = RPCClient(client_side, Target(topic=topic), timeout=1.0)
    error, elapsed = await _elapsed(client.call(RequestContext(), "ping"))
    assert isinstance(error, MessagingTimeout), repr(error)
    assert 1.0 <= elapsed < 1.0 + FAST, elapsed
    assert "no queue is bound for topic" in str(error), str(error)


async def test_topic_call_reaches_a_server_that_starts_within_its_deadline(
    pair: tuple[Transport, Transport], topic: str
) -> None:
    """A topic-addressed call keeps trying while nobody serves the topic (a conductor
    re-declaring its queue after a broker restart), and is delivered once one does."""
    server_side, client_side = pair
    client = RPCClient(client_side, Target(topic=topic), timeout=10.0)
    call = asyncio.create_task(client.call(RequestContext(), "ping"))
    await asyncio.sleep(0.6)
    assert not call.done()
    async with RPCServer(
        server_side, Target(topic=topic, server="late"), [Relay(server_side, topic)]
    ):
        assert await asyncio.wait_for(call, 5.0) == "pong"
