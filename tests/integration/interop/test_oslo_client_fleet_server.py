"""An unmodified oslo.messaging RPCClient (own process, own transport) calls Fleet RPCServers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import interop_errors
import pytest

from shared_objects import exception as fleet_exception
from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import RPCServer, Target, Transport, expose
from shared_objects.testing import PeerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SERVERS = ("fleet1", "fleet2")
ORIGINAL_CONTEXT = {"user": "alice", "project_id": "p1", "request_id": "req-123"}


class Seen:
    """The calls the Fleet servers handled: ``(server, method, kwargs)``, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self._changed = asyncio.Condition()

    async def add(self, server: str, method: str, kwargs: dict[str, Any]) -> None:
        async with self._changed:
            self.calls.append((server, method, kwargs))
            self._changed.notify_all()

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.calls) >= count)


class Endpoint:
    """Records what it was asked, on which server, with which context."""

    target = Target(version="1.3")

    def __init__(self, server: str, seen: Seen) -> None:
        self.server = server
        self.seen = seen

    @expose
    async def echo(self, ctxt: RequestContext, **kwargs: Any) -> dict[str, Any]:
        await self.seen.add(self.server, "echo", kwargs)
        return {
            "args": kwargs,
            "server": self.server,
            "user": ctxt.user_id,
            "project": ctxt.project_id,
            "request_id": ctxt.request_id,
            "caller": ctxt.caller,
        }

    @expose
    async def note(self, ctxt: RequestContext, **kwargs: Any) -> None:
        await self.seen.add(self.server, "note", kwargs)

    @expose
    async def slow(self, ctxt: RequestContext, delay: float) -> str:
        await asyncio.sleep(delay)
        return f"slept {delay}"

    @expose
    async def fail_value(self, ctxt: RequestContext, message: str) -> None:
        raise ValueError(message)

    @expose
    async def fail_fleet(self, ctxt: RequestContext, objname: str) -> None:
        raise fleet_exception.NoDatabaseAccess(objname=objname, method="save")

    @expose
    async def fail_interop(self, ctxt: RequestContext, message: str) -> None:
        raise interop_errors.InteropError(message, code=7)

    async def hidden(self, ctxt: RequestContext) -> str:
        return "must not be callable: not exposed"


@pytest.fixture
async def seen(
    fleet_transport: Transport, topic: str, delete_test_queues: list[str]
) -> AsyncIterator[Seen]:
    """Two Fleet servers on ``topic``; yields the record of calls they handled."""
    delete_test_queues.extend(f"{topic}.{name}" for name in SERVERS)
    calls = Seen()
    servers = [
        RPCServer(fleet_transport, Target(topic=topic, server=name), [Endpoint(name, calls)])
        for name in SERVERS
    ]
    for server in servers:
        await server.start()
    try:
        yield calls
    finally:
        for server in servers:
            await server.stop(grace=5)


@pytest.fixture
async def oslo_client(start_oslo_peer: Any, seen: Seen) -> PeerProcess:
    client: PeerProcess = await start_oslo_peer(
        "client", allowed_exmods=",".join(fleet_exception.ALLOWED_REMOTE_EXMODS)
    )
    return client


async def _call(client: PeerProcess, method: str, **extra: Any) -> dict[str, Any]:
    command = {"op": "call", "method": method, "timeout": 10, "ctxt": ORIGINAL_CONTEXT, **extra}
    return await client.request(command, within=20)


async def test_oslo_call_reaches_fleet_server_with_args_and_context(
    oslo_client: PeerProcess,
) -> None:
    args = {"arg": [1, "two", {"three": 3.0}], "text": "zürich"}
    reply = await _call(oslo_client, "echo", args=args)
    assert reply["ok"], reply
    result = reply["result"]
    assert result["args"] == args
    assert result["server"] in SERVERS
    assert (result["user"], result["project"], result["request_id"]) == ("alice", "p1", "req-123")
    # The caller identity is the broker-validated AMQP user_id: oslo's kombu sets none, so
    # Fleet must not invent one from the body.
    assert result["caller"] is None


async def test_oslo_server_targeted_call_reaches_only_that_fleet_server(
    oslo_client: PeerProcess, seen: Seen
) -> None:
    for i in range(6):
        reply = await _call(oslo_client, "echo", args={"i": i}, server="fleet2")
        assert reply["ok"], reply
        assert reply["result"]["server"] == "fleet2"
    assert {server for server, _, _ in seen.calls} == {"fleet2"}


async def test_oslo_cast_is_handled_by_one_fleet_server(
    oslo_client: PeerProcess, seen: Seen
) -> None:
    reply = await oslo_client.request(
        {"op": "cast", "method": "note", "args": {"n": 1}, "ctxt": ORIGINAL_CONTEXT}, within=20
    )
    assert reply["ok"], reply
    await seen.wait_for(1)
    await asyncio.sleep(0.3)  # a second delivery would show up by now
    assert [(method, args) for _, method, args in seen.calls] == [("note", {"n": 1})]


async def test_oslo_fanout_cast_reaches_every_fleet_server(
    oslo_client: PeerProcess, seen: Seen
) -> None:
    reply = await oslo_client.request(
        {"op": "cast", "method": "note", "args": {"n": 2}, "fanout": True, "ctxt": {}}, within=20
    )
    assert reply["ok"], reply
    await seen.wait_for(2)
    assert sorted(server for server, _, _ in seen.calls) == sorted(SERVERS)
    assert all(args == {"n": 2} for _, _, args in seen.calls)


async def test_fleet_value_error_arrives_at_oslo_as_value_error(oslo_client: PeerProcess) -> None:
    reply = await _call(oslo_client, "fail_value", args={"message": "bad value from fleet"})
    assert not reply["ok"]
    assert (reply["exc_module"], reply["exc_class"]) == ("builtins", "ValueError")
    assert reply["message"].startswith("bad value from fleet")


async def test_fleet_exception_from_allowed_module_arrives_at_oslo_as_remote_subclass(
    oslo_client: PeerProcess,
) -> None:
    reply = await _call(oslo_client, "fail_fleet", args={"objname": "Instance"})
    assert not reply["ok"]
    assert reply["exc_class"] == "NoDatabaseAccess_Remote"
    assert "shared_objects.exception.NoDatabaseAccess" in reply["mro"]
    assert "Instance.save needs the conductor" in reply["message"]
    assert reply["kwargs"] == {"objname": "Instance", "method": "save"}


async def test_fleet_exception_from_other_module_arrives_at_oslo_as_remote_error(
    oslo_client: PeerProcess,
) -> None:
    reply = await _call(oslo_client, "fail_interop", args={"message": "not allowed there"})
    assert not reply["ok"]
    assert reply["exc_class"] == "RemoteError"
    assert reply["exc_type"] == "InteropError"
    assert "not allowed there" in reply["message"]


@pytest.mark.parametrize("method", ["hidden", "no_such_method", "_private"])
async def test_oslo_call_to_unexposed_method_gets_error_reply_not_timeout(
    oslo_client: PeerProcess, method: str, seen: Seen
) -> None:
    reply = await _call(oslo_client, method)
    assert not reply["ok"]
    assert reply["exc_class"] == "RemoteError"
    assert reply["exc_type"] == "NoSuchMethod"
    assert reply["elapsed"] < 5
    assert seen.calls == []


async def test_oslo_call_with_incompatible_version_gets_unsupported_version(
    oslo_client: PeerProcess,
) -> None:
    reply = await _call(oslo_client, "echo", version="2.0")
    assert not reply["ok"]
    assert (reply["exc_class"], reply["exc_type"]) == ("RemoteError", "UnsupportedVersion")
    reply = await _call(oslo_client, "echo", version="1.3", args={"ok": True})
    assert reply["ok"], reply


async def test_fleet_heartbeats_keep_an_oslo_call_monitor_satisfied_during_a_slow_call(
    oslo_client: PeerProcess,
) -> None:
    # Without call-monitor heartbeats the oslo caller gives up after 2 s of silence.
    reply = await _call(
        oslo_client, "slow", args={"delay": 3.5}, timeout=15, call_monitor_timeout=2
    )
    assert reply["ok"], reply
    assert reply["result"] == "slept 3.5"
    assert reply["elapsed"] >= 3.5


async def test_slow_fleet_call_without_call_monitor_sends_oslo_no_heartbeat(
    oslo_client: PeerProcess,
) -> None:
    # A heartbeat the oslo caller did not ask for crashes it (wire reference 0.3).
    reply = await _call(oslo_client, "slow", args={"delay": 2.5}, timeout=15)
    assert reply["ok"], reply
    assert reply["result"] == "slept 2.5"


async def test_oslo_threaded_burst_gets_every_result_back_to_its_own_caller(
    oslo_client: PeerProcess, seen: Seen
) -> None:
    command = {"op": "burst", "method": "echo", "count": 300, "threads": 16, "timeout": 20}
    reply = await oslo_client.request(command, within=60)
    assert reply["ok"], reply
    assert reply["correct"] == 300
    assert len(seen.calls) == 300
