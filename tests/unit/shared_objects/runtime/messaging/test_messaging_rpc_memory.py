"""Client semantics over the in-memory transport (fast, no broker): calls, casts, targets, remote
errors, versions, timeouts and the call monitor.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from rpc_memory_endpoint import TOPIC, Endpoint, LocalError, memory_config
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import (
    InvalidTarget,
    MessagingTimeout,
    NoSuchMethod,
    RemoteError,
    RPCClient,
    RPCServer,
    RPCVersionCapError,
    Target,
    Transport,
    UnsupportedVersion,
    get_transport,
)
from shared_objects.testing.eventually import eventually


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
    other_client_t = get_transport(memory_config("bob"), memory_broker=client_t.driver.broker)  # type: ignore[attr-defined]
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
