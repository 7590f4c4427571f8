"""Client and server semantics over the in-memory transport (fast, no broker)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
import structlog.contextvars
from structlog.testing import capture_logs

from shared_objects.config import MessagingConfig
from shared_objects.context import RequestContext
from shared_objects.messaging import (
    InvalidTarget,
    MemoryBroker,
    MessagingError,
    MessagingTimeout,
    NoSuchMethod,
    RemoteError,
    RPCClient,
    RPCServer,
    RPCVersionCapError,
    Target,
    Transport,
    UnsupportedVersion,
    codec,
    expose,
    get_transport,
    release_handler_slot,
)
from shared_objects.messaging.driver import Delivery
from shared_objects.messaging.topology import QueueSpec
from shared_objects.testing.eventually import eventually

TOPIC = "compute"


class LocalError(Exception):
    """Defined in this test module; allowed or not per test."""


class Endpoint:
    target = Target(version="1.3")

    def __init__(self, name: str = "s1") -> None:
        self.name = name
        self.seen: list[Any] = []
        self.running = 0
        self.max_running = 0
        self.release = asyncio.Event()

    @expose
    async def echo(self, ctxt: RequestContext, value: Any) -> dict[str, Any]:
        self.seen.append(value)
        return {
            "value": value,
            "server": self.name,
            "caller": ctxt.caller,
            "request_id": ctxt.request_id,
        }

    @expose
    async def sleep(self, ctxt: RequestContext, seconds: float) -> str:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1
        return "slept"

    @expose
    async def log_context(self, ctxt: RequestContext) -> dict[str, Any]:
        return dict(structlog.contextvars.get_contextvars())

    @expose
    async def fail_local(self, ctxt: RequestContext) -> None:
        raise LocalError("local failure")

    @expose
    async def fail_builtin(self, ctxt: RequestContext) -> None:
        raise KeyError("missing")

    @expose
    async def unserialisable(self, ctxt: RequestContext) -> object:
        return object()


def _config(user: str = "guest", **overrides: Any) -> MessagingConfig:
    return MessagingConfig(
        transport_url=f"memory://{user}@unit/", control_exchange="fleet-unit", **overrides
    )


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def transports(broker: MemoryBroker) -> AsyncIterator[tuple[Transport, Transport]]:
    """(server transport as user 'host1', client transport as user 'alice') on one broker."""
    server_t = get_transport(_config("host1"), memory_broker=broker)
    client_t = get_transport(
        _config("alice"), allowed_remote_exmods=[__name__], memory_broker=broker
    )
    async with server_t, client_t:
        yield server_t, client_t


@pytest.fixture
async def served(
    transports: tuple[Transport, Transport],
) -> AsyncIterator[tuple[Endpoint, RPCClient]]:
    server_t, client_t = transports
    endpoint = Endpoint()
    async with RPCServer(server_t, Target(topic=TOPIC, server="s1"), [endpoint]):
        yield endpoint, RPCClient(client_t, Target(topic=TOPIC, version="1.2"), timeout=2.0)


async def test_call_returns_result_with_broker_user_as_caller(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    result = await client.call(RequestContext(request_id="req-abc"), "echo", value=[1, "x"])
    assert result == {"value": [1, "x"], "server": "s1", "caller": "alice", "request_id": "req-abc"}


async def test_request_id_is_generated_and_bound_into_log_context(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    bound = await client.call(None, "log_context")
    assert bound["request_id"].startswith("req-")
    assert bound["caller"] == "alice"
    assert bound["method"] == "log_context"


async def test_cast_and_server_targeted_cast_reach_the_server(
    served: tuple[Endpoint, RPCClient],
) -> None:
    endpoint, client = served
    await client.cast(None, "echo", value="cast")
    await client.prepare(server="s1").cast(None, "echo", value="direct")
    await eventually(lambda: len(endpoint.seen) == 2, 1, interval=0.01)
    assert sorted(endpoint.seen) == ["cast", "direct"]


async def test_server_targeted_call_and_fanout_cast(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    e1, e2 = Endpoint("s1"), Endpoint("s2")
    async with (
        RPCServer(server_t, Target(topic=TOPIC, server="s1"), [e1]),
        RPCServer(server_t, Target(topic=TOPIC, server="s2"), [e2]),
    ):
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        for _ in range(5):
            assert (await client.prepare(server="s2").call(None, "echo", value=1))["server"] == "s2"
        await client.prepare(fanout=True).cast(None, "echo", value="all")
        await eventually(lambda: "all" in e1.seen and "all" in e2.seen, 1, interval=0.01)
        assert e1.seen == ["all"]
        assert e2.seen.count("all") == 1


async def test_call_cannot_be_fanout(served: tuple[Endpoint, RPCClient]) -> None:
    _, client = served
    with pytest.raises(InvalidTarget):
        await client.prepare(fanout=True).call(None, "echo", value=1)


def test_server_target_needs_topic_and_server(transports: tuple[Transport, Transport]) -> None:
    with pytest.raises(InvalidTarget):
        RPCServer(transports[0], Target(topic=TOPIC), [Endpoint()])


async def test_remote_errors_map_by_allowed_module(transports: tuple[Transport, Transport]) -> None:
    server_t, client_t = transports
    other_client_t = get_transport(_config("bob"), memory_broker=client_t.driver.broker)  # type: ignore[attr-defined]
    async with other_client_t, RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()]):
        allowed = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        not_allowed = RPCClient(other_client_t, Target(topic=TOPIC), timeout=2.0)
        with pytest.raises(LocalError, match="local failure"):
            await allowed.call(None, "fail_local")
        with pytest.raises(RemoteError) as info:
            await not_allowed.call(None, "fail_local")
        assert info.value.exc_type == "LocalError"
        with pytest.raises(KeyError):
            await not_allowed.call(None, "fail_builtin")


async def test_unknown_method_and_version_are_error_replies(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    with pytest.raises(NoSuchMethod):
        await client.call(None, "nope")
    with pytest.raises(NoSuchMethod):
        await client.call(None, "_private")
    with pytest.raises(UnsupportedVersion):
        await client.prepare(version="1.4").call(None, "echo", value=1)
    with pytest.raises(TypeError):
        await client.call(None, "echo", wrong_argument=1)


async def test_unserialisable_result_becomes_an_error_reply(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    with pytest.raises(TypeError, match="not JSON serializable"):
        await client.call(None, "unserialisable")


async def test_version_cap(transports: tuple[Transport, Transport]) -> None:
    _, client_t = transports
    client = RPCClient(client_t, Target(topic=TOPIC, version="1.0"), version_cap="1.2", timeout=1.0)
    assert client.can_send_version("1.2")
    assert not client.can_send_version("1.3")
    assert not client.can_send_version("2.0")
    assert RPCClient(client_t, Target(topic=TOPIC)).can_send_version("9.9")
    with pytest.raises(RPCVersionCapError, match=r"1\.3.*1\.2"):
        await client.prepare(version="1.3").call(None, "echo", value=1)
    with pytest.raises(RPCVersionCapError):
        await client.prepare(version="1.3").cast(None, "echo", value=1)
    assert client_t.driver.stats()["published"] == 0


async def test_timeout_names_method_target_and_timeout_and_late_reply_is_dropped(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    start = time.monotonic()
    with pytest.raises(MessagingTimeout) as info:
        await client.prepare(timeout=0.3).call(None, "sleep", seconds=0.6)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 0.5
    text = str(info.value)
    assert "'sleep'" in text and "topic=compute" in text and "0.3" in text
    assert client.transport.pending_replies == 0
    assert client.pending_count == 0
    with capture_logs() as logs:
        await eventually(lambda: any(e["event"] == "late_reply_dropped" for e in logs), 2)
    assert client.transport.stats()["late_replies"] == 1
    assert client.stats()["calls"]["sleep:timeout"] == 1


async def test_pending_futures_return_to_zero_after_many_outcomes(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    calls = [client.call(None, "echo", value=i) for i in range(50)]
    calls += [client.call(None, "nope") for _ in range(10)]
    calls += [client.prepare(timeout=0.05).call(None, "sleep", seconds=0.2) for _ in range(10)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [r["value"] for r in results[:50]] == list(range(50))  # type: ignore[index]
    assert all(isinstance(r, NoSuchMethod) for r in results[50:60])
    assert all(isinstance(r, MessagingTimeout) for r in results[60:])
    assert client.transport.pending_replies == 0
    assert client.pending_count == 0


async def test_call_monitor_heartbeats_keep_a_long_call_alive(
    served: tuple[Endpoint, RPCClient],
) -> None:
    _, client = served
    cctx = client.prepare(timeout=10.0, call_monitor_timeout=2)
    assert await cctx.call(None, "sleep", seconds=2.6) == "slept"


async def test_call_monitor_times_out_when_nobody_heartbeats(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    # A consumer that takes requests and never answers (nor heartbeats).
    await server_t.driver.subscribe(
        [server_t.topology.topic_queue(server_t.topology.control_exchange(), "silent")],
        lambda d: d.ack(),
    )
    client = RPCClient(client_t, Target(topic="silent"), timeout=10.0, call_monitor_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(MessagingTimeout, match="call-monitor"):
        await client.call(None, "anything")
    assert time.monotonic() - start < 1.0
    assert client_t.pending_replies == 0


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
    server_t = get_transport(_config("host1"), memory_broker=broker)
    client_t = get_transport(_config("alice"), memory_broker=broker)
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
