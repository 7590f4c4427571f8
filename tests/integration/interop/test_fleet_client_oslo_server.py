"""A Fleet RPCClient calls unmodified oslo.messaging RPCServers (own process, own transport)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import interop_errors
import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import (
    MessageUndeliverable,
    MessagingTimeout,
    RemoteError,
    RPCClient,
    Target,
    Transport,
)
from shared_objects.testing import PeerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SERVERS = ("oslo1", "oslo2")


@pytest.fixture
async def oslo_server(
    start_oslo_peer: Any, delete_test_queues: list[str], topic: str
) -> PeerProcess:
    delete_test_queues.extend(f"{topic}.{name}" for name in SERVERS)
    server: PeerProcess = await start_oslo_peer("server", servers=",".join(SERVERS))
    return server


@pytest.fixture
def client(fleet_transport: Transport, topic: str) -> RPCClient:
    return RPCClient(fleet_transport, Target(topic=topic, version="1.0"), timeout=10)


def _context() -> RequestContext:
    return RequestContext(user_id="alice", project_id="p1", request_id="req-fleet-1")


def _received(server: PeerProcess, method: str) -> list[dict[str, Any]]:
    return [e for e in server.events if e.get("event") == "received" and e["method"] == method]


async def test_fleet_call_reaches_oslo_server_with_args_and_context(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    args = {"arg": [1, "two", {"three": 3.0}], "text": "zürich"}
    result = await client.call(_context(), "echo", **args)
    assert result["args"] == args
    assert result["server"] in SERVERS
    ctxt = result["ctxt"]
    assert (ctxt["user"], ctxt["project_id"], ctxt["request_id"]) == ("alice", "p1", "req-fleet-1")


async def test_fleet_server_targeted_call_reaches_only_that_oslo_server(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    cctx = client.prepare(server="oslo2")
    for i in range(6):
        assert (await cctx.call(_context(), "echo", i=i))["server"] == "oslo2"
    assert {e["server"] for e in _received(oslo_server, "echo")} == {"oslo2"}


async def test_fleet_cast_is_handled_by_one_oslo_server(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    await client.cast(_context(), "note", n=1)
    event = await oslo_server.wait_event(lambda e: e.get("method") == "note", within=10)
    assert event["args"] == {"n": 1}
    assert event["ctxt"]["user"] == "alice"
    # A round trip afterwards bounds the time a duplicate delivery could still take.
    await client.call(_context(), "echo")
    assert len(_received(oslo_server, "note")) == 1


async def test_fleet_fanout_cast_reaches_every_oslo_server(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    await client.prepare(fanout=True).cast(_context(), "note", n=2)
    events = await oslo_server.wait_events(lambda e: e.get("method") == "note", 2, within=10)
    assert sorted(e["server"] for e in events) == sorted(SERVERS)
    assert all(e["args"] == {"n": 2} for e in events)


async def test_oslo_value_error_arrives_at_fleet_as_value_error(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    with pytest.raises(ValueError, match="bad value from oslo") as info:
        await client.call(_context(), "fail_value", message="bad value from oslo")
    assert type(info.value) is ValueError


async def test_oslo_exception_from_allowed_module_arrives_at_fleet_as_its_class(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    with pytest.raises(interop_errors.InteropError, match="domain failure") as info:
        await client.call(_context(), "fail_custom", message="domain failure")
    assert info.value.kwargs == {"code": 42}


async def test_oslo_exception_from_other_module_arrives_at_fleet_as_remote_error(
    oslo_server: PeerProcess, fleet_transport: Transport, topic: str
) -> None:
    from shared_objects.runtime.config import MessagingConfig
    from shared_objects.runtime.messaging import get_transport

    config: MessagingConfig = fleet_transport.config
    async with get_transport(config) as strict:  # interop_errors not allowed here
        strict_client = RPCClient(strict, Target(topic=topic), timeout=10)
        with pytest.raises(RemoteError) as info:
            await strict_client.call(_context(), "fail_custom", message="domain failure")
    assert info.value.exc_type == "InteropError"
    assert "domain failure" in str(info.value.value)


async def test_oslo_no_such_method_and_unsupported_version_arrive_as_remote_errors(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    with pytest.raises(RemoteError) as info:
        await client.call(_context(), "no_such_method")
    assert info.value.exc_type == "NoSuchMethod"
    with pytest.raises(RemoteError) as info:
        await client.prepare(version="1.4").call(_context(), "echo")
    assert info.value.exc_type == "UnsupportedVersion"
    assert (await client.prepare(version="1.3").call(_context(), "echo", v=1))["args"] == {"v": 1}


async def test_fleet_call_to_absent_oslo_server_fails_fast_and_cleanly(
    oslo_server: PeerProcess, client: RPCClient, fleet_transport: Transport
) -> None:
    # Server-addressed calls are mandatory: no queue for "nobody", the broker returns it.
    started = time.monotonic()
    with pytest.raises(MessageUndeliverable, match="nobody"):
        await client.prepare(server="nobody", timeout=10.0).call(_context(), "echo")
    assert time.monotonic() - started < 1.0
    assert fleet_transport.pending_replies == 0


async def test_oslo_heartbeats_keep_a_fleet_call_monitor_satisfied_during_a_slow_call(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    cctx = client.prepare(timeout=15, call_monitor_timeout=2)
    started = time.monotonic()
    assert await cctx.call(_context(), "slow", delay=3.5) == "slept 3.5"
    assert time.monotonic() - started >= 3.5


async def test_fleet_call_monitor_gives_up_on_a_silent_peer_before_the_call_timeout(
    oslo_server: PeerProcess, client: RPCClient
) -> None:
    # Nobody serves this topic, so no heartbeat ever comes: the monitor fires first. (A call to
    # an absent server no longer waits at all: see the test above.)
    cctx = client.prepare(topic="nobody-serves-this", timeout=15, call_monitor_timeout=2)
    started = time.monotonic()
    with pytest.raises(MessagingTimeout):
        await cctx.call(_context(), "slow", delay=1)
    assert time.monotonic() - started < 2 + 1.0


async def test_fleet_concurrent_calls_to_oslo_servers_each_get_their_own_result(
    oslo_server: PeerProcess, client: RPCClient, fleet_transport: Transport
) -> None:
    results = await asyncio.gather(*(client.call(_context(), "echo", i=i) for i in range(300)))
    assert [r["args"] for r in results] == [{"i": i} for i in range(300)]
    assert {r["server"] for r in results} == set(SERVERS)
    assert fleet_transport.pending_replies == 0
