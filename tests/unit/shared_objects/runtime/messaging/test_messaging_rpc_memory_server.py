"""Server semantics over the in-memory transport (fast, no broker): heartbeats, duplicates,
concurrency, stop, bad messages, replies that cannot be delivered, expiration.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from rpc_memory_endpoint import TOPIC, Endpoint, memory_config
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import (
    MemoryBroker,
    MessagingError,
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    codec,
    expose,
    get_transport,
    release_handler_slot,
)
from shared_objects.runtime.messaging.driver import Delivery
from shared_objects.runtime.messaging.topology import QueueSpec
from shared_objects.testing.eventually import eventually


async def _raw_replies(transport: Transport, name: str) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = []

    async def collect(delivery: Delivery) -> None:
        replies.append(codec.decode_message(delivery.body))

    await transport.driver.subscribe([QueueSpec(name)], collect, no_ack=True)
    return replies


@pytest.mark.parametrize(
    ("client_timeout", "heartbeats"), [(None, 0), (1, 0), ("3", 0), (True, 0), (2, 1)]
)
async def test_heartbeats_only_when_request_carries_numeric_timeout_of_2_or_more(
    transports: tuple[Transport, Transport], client_timeout: Any, heartbeats: int
) -> None:
    server_t, client_t = transports
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()]):
        replies = await _raw_replies(client_t, "reply_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
        request = {
            "method": "sleep",
            "args": {"seconds": 1.2},
            "version": "1.0",
            "_msg_id": "m1",
            "_reply_q": "reply_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "_timeout": client_timeout,
            "_unique_id": "u1",
        }
        await client_t.driver.publish(
            client_t.topology.control_exchange(), TOPIC, codec.encode_message(request)
        )
        await eventually(lambda: replies and replies[-1].get("ending"), 3, interval=0.01)
    assert [r["ending"] for r in replies] == [False] * heartbeats + [True]
    assert replies[-1]["result"] == "slept" and replies[-1]["failure"] is None
    assert all(
        r["_msg_id"] == "m1" and {"result", "failure", "ending", "_unique_id"} <= r.keys()
        for r in replies
    )


async def test_duplicate_unique_id_is_executed_once(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    endpoint = Endpoint()
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [endpoint]) as server:
        request = codec.encode_message(
            {"method": "echo", "args": {"value": 1}, "_unique_id": "same"}
        )
        for _ in range(3):
            await client_t.driver.publish(client_t.topology.control_exchange(), TOPIC, request)
        await eventually(lambda: server.stats()["dropped"].get("duplicate") == 2, 1)
        assert endpoint.seen == [1]


async def test_concurrency_is_bounded_by_max_concurrency(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    endpoint = Endpoint()
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [endpoint], max_concurrency=3):
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=5.0)
        await asyncio.gather(*[client.call(None, "sleep", seconds=0.02) for _ in range(20)])
    assert endpoint.max_running == 3


class BatchWaiter:
    """A handler that waits for a batch another task completes (as report_alive does)."""

    target = Target(version="1.0")

    def __init__(self) -> None:
        self.batch = asyncio.Event()
        self.waiting = 0
        self.both_waiting = asyncio.Event()

    @expose
    async def wait_for_batch(self, ctxt: RequestContext, release: bool) -> str:
        if release:
            release_handler_slot()
        self.waiting += 1
        if self.waiting == 2:
            self.both_waiting.set()
        await self.batch.wait()
        return "batched"

    @expose
    async def other(self, ctxt: RequestContext) -> str:
        return "served"


@pytest.mark.parametrize("release", [True, False])
async def test_a_handler_waiting_for_a_batch_can_give_back_its_slot(
    transports: tuple[Transport, Transport], release: bool
) -> None:
    server_t, client_t = transports
    endpoint = BatchWaiter()
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [endpoint], max_concurrency=2):
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=5.0)
        waiters = [asyncio.create_task(client.call(None, "wait_for_batch", release=release))]
        waiters.append(asyncio.create_task(client.call(None, "wait_for_batch", release=release)))
        async with asyncio.timeout(5):
            await endpoint.both_waiting.wait()
        if release:
            # Both waiters gave their slots back: other requests are served meanwhile.
            assert await client.call(None, "other") == "served"
        else:
            with pytest.raises(MessagingTimeout):  # both slots held: nothing else runs
                await client.prepare(timeout=0.3).call(None, "other")
        endpoint.batch.set()
        assert await asyncio.gather(*waiters) == ["batched", "batched"]
        assert await client.call(None, "other") == "served"  # slots released exactly once


async def test_stop_waits_for_in_flight_handlers_within_grace(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    server = RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()])
    await server.start()
    client = RPCClient(client_t, Target(topic=TOPIC), timeout=5.0)
    call = asyncio.create_task(client.call(None, "sleep", seconds=0.2))
    await eventually(lambda: server.in_flight == 1, 1, interval=0.005)
    await server.stop(grace=2.0)
    assert await call == "slept"


async def test_stop_cancels_handlers_after_grace(transports: tuple[Transport, Transport]) -> None:
    server_t, client_t = transports
    server = RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()])
    await server.start()
    client = RPCClient(client_t, Target(topic=TOPIC), timeout=1.0)
    call = asyncio.create_task(client.call(None, "sleep", seconds=30))
    await eventually(lambda: server.in_flight == 1, 1, interval=0.005)
    start = time.monotonic()
    await server.stop(grace=0.1)
    assert time.monotonic() - start < 0.5
    assert server.in_flight == 0
    with pytest.raises(MessagingTimeout):
        await call


async def test_every_bad_message_is_acked_and_answered_when_addressable(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    server_t, client_t = transports
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()]) as server:
        replies = await _raw_replies(client_t, "reply_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
        addr = {"_reply_q": "reply_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}
        bodies = [
            b"\x00not json",
            b"[1, 2, 3]",
            codec.encode_message({"args": {}, "_msg_id": "no-method", **addr}),
            codec.encode_message({"method": "echo", "args": [1], "_msg_id": "args-list", **addr}),
            codec.encode_message({"method": "echo", "namespace": "zzz", "_msg_id": "ns", **addr}),
            codec.encode_message({"method": "__class__", "_msg_id": "dunder", **addr}),
            codec.encode_message(
                {"method": "echo", "version": 3, "_msg_id": "version-int", **addr}
            ),
            codec.encode_message(
                {
                    "method": "echo",
                    "args": {"value": 1},
                    "_msg_id": "ctx",
                    "_context_roles": "x",
                    "_context_request_id": 5,
                    **addr,
                }
            ),
            json.dumps(
                {"oslo.version": "3.0", "oslo.message": json.dumps({"_msg_id": "env3", **addr})}
            ).encode(),
            codec.encode_message({"method": "echo", "args": {"value": 1}, "_msg_id": 1, **addr}),
        ]
        for body in bodies:
            await client_t.driver.publish(client_t.topology.control_exchange(), TOPIC, body)
        # Seven answered, two dropped as malformed.
        await eventually(
            lambda: len(replies) == 7 and server.stats()["dropped"].get("malformed") == 2, 2
        )
        assert broker.message_count(TOPIC) == (0, 0)
        by_id = {r["_msg_id"]: r for r in replies}
        assert set(by_id) == {
            "no-method",
            "args-list",
            "ns",
            "dunder",
            "version-int",
            "ctx",
            "env3",
        }
        assert by_id["ctx"]["failure"] is None  # odd context values are tolerated
        for msg_id in ("no-method", "args-list", "ns", "dunder", "version-int", "env3"):
            assert by_id[msg_id]["failure"], msg_id
        assert server.stats()["dropped"]["malformed"] == 2
        # still serving
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        assert (await client.call(None, "echo", value="ok"))["value"] == "ok"


async def test_reply_to_missing_queue_is_retried_briefly_then_dropped_and_logged(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    exchange = client_t.topology.control_exchange()
    server = RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [Endpoint()], reply_retry_window=0.6
    )
    async with server:
        request = {
            "method": "echo",
            "args": {"value": 1},
            "_msg_id": "m",
            "_reply_q": "reply_cccccccccccccccccccccccccccccccc",
        }
        await client_t.driver.publish(exchange, TOPIC, codec.encode_message(request))
        await eventually(lambda: server.stats()["calls"], 1, what="the request handled")
        assert server.stats()["dropped"] == {}  # bounced, retrying in the background
        assert server.in_flight == 0  # ... without holding a handler slot
        replies = await _raw_replies(
            client_t, "reply_cccccccccccccccccccccccccccccccc"
        )  # the caller's queue comes back
        await eventually(lambda: replies, 1, interval=0.01)
        assert [r["_msg_id"] for r in replies] == ["m"]

        with capture_logs() as logs:
            request["_reply_q"] = "reply_dddddddddddddddddddddddddddddddd"
            await client_t.driver.publish(exchange, TOPIC, codec.encode_message(request))
            await eventually(lambda: server.stats()["dropped"].get("reply_undeliverable") == 1, 3)
            # Known to be gone now: the next reply to it is dropped at once.
            await client_t.driver.publish(exchange, TOPIC, codec.encode_message(request))
            await eventually(lambda: server.stats()["dropped"].get("reply_undeliverable") == 2, 1)
        assert [e["event"] for e in logs].count("reply_undeliverable") == 2


async def test_request_expiration_drops_unconsumed_calls(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    _, client_t = transports
    topology = client_t.topology
    await client_t.driver.declare([topology.topic_queue(topology.control_exchange(), "nobody")])
    with pytest.raises(MessagingTimeout):
        await RPCClient(client_t, Target(topic="nobody"), timeout=0.1).call(None, "x")
    assert broker.message_count("nobody") == (1, 0)
    # The message expires ``timeout`` after it was published, which may be a little after the
    # call started (a loaded machine): let that moment pass too. (A wait for time itself: the
    # broker only notices expiry when it next looks at the queue.)
    await asyncio.sleep(0.15)
    server_t, _ = transports
    seen: list[bytes] = []

    async def consume(delivery: Delivery) -> None:
        seen.append(delivery.body)
        await delivery.ack()

    await server_t.driver.subscribe(
        [topology.topic_queue(topology.control_exchange(), "nobody")], consume
    )
    assert seen == []  # expired before anyone consumed it
    assert broker.message_count("nobody") == (0, 0)


async def test_stop_hands_messages_not_started_back_to_the_broker(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    server_t, client_t = transports
    server = RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()], max_concurrency=1)
    await server.start()
    client = RPCClient(client_t, Target(topic=TOPIC), timeout=5.0)
    calls = [asyncio.create_task(client.call(None, "sleep", seconds=0.1)) for _ in range(5)]
    # One runs, four wait for the slot (delivered, not acked).
    await eventually(
        lambda: server.in_flight == 1 and broker.message_count(TOPIC) == (0, 4), 1, interval=0.005
    )
    await server.stop(grace=1.0)
    assert broker.message_count(TOPIC) == (4, 0)  # handed back, not lost, not run
    assert server.stats()["calls"] == {"sleep:ok": 1}
    second = RPCServer(server_t, Target(topic=TOPIC, server="s2"), [Endpoint()])
    async with second:
        assert await asyncio.gather(*calls) == ["slept"] * 5
    assert second.stats()["calls"] == {"sleep:ok": 4}


async def test_closing_the_transport_fails_waiting_calls_with_a_clear_error(
    broker: MemoryBroker,
) -> None:
    server_t = get_transport(memory_config("host1"), memory_broker=broker)
    client_t = get_transport(memory_config("alice"), memory_broker=broker)
    server = RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()])
    async with server_t, server:
        await client_t.connect()
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=5.0)
        call = asyncio.create_task(client.call(None, "sleep", seconds=1))
        await eventually(lambda: server.in_flight == 1, 1, interval=0.005)
        await client_t.close()
        with pytest.raises(MessagingError, match="transport closed"):
            await call
        assert client_t.pending_replies == 0
