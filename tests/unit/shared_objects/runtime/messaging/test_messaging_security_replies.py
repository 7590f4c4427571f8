"""Issue 11 in the RPC runtime, on the in-memory transport: reply authentication, exclusive
login-named reply queues, and servers that stay off the shared topic queue.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from security_endpoints import TOPIC, Endpoint
from structlog.testing import capture_logs

from shared_objects.runtime.messaging import (
    MemoryBroker,
    MessagingError,
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from shared_objects.runtime.messaging.memory import MemoryDriver
from shared_objects.runtime.messaging.topology import DEFAULT_EXCHANGE, QueueSpec
from shared_objects.testing.eventually import eventually
from shared_objects.testing.forged import replies_only_from, reply_body


async def test_forged_reply_is_ignored_and_the_genuine_one_returned(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    conductor_t, host_t = sec_transports
    endpoint = Endpoint()
    endpoint.release.clear()
    mallory = MemoryDriver(broker, user_id="host-2")
    async with RPCServer(conductor_t, Target(topic="conductor", server="c1"), [endpoint]):
        client = RPCClient(
            host_t,
            Target(topic="conductor"),
            timeout=2.0,
            reply_from=replies_only_from("conductor"),
        )
        call = asyncio.create_task(client.call(None, "echo", value="genuine"))
        await eventually(lambda: endpoint.calls, 2.0, interval=0.005)
        (msg_id,) = host_t.replies._waiters
        reply_q = host_t.replies.queue_name
        with capture_logs() as logs:
            await mallory.publish(DEFAULT_EXCHANGE, reply_q, reply_body(msg_id, "forged"))
            await mallory.publish(DEFAULT_EXCHANGE, reply_q, reply_body(msg_id, None, ending=False))
            await eventually(lambda: host_t.stats()["forged_replies"] == 2, 2.0)
        assert not call.done()
        endpoint.release.set()
        assert (await call)["value"] == "genuine"
    refused = [e for e in logs if e["event"] == "reply_refused"]
    assert [(e["log_level"], e["msg_id"], e["login"]) for e in refused] == [
        ("warning", msg_id, "host-2"),
        ("warning", msg_id, "host-2"),
    ]
    assert host_t.stats()["forged_replies"] == 2
    assert host_t.pending_replies == 0


async def test_reply_without_user_id_is_refused_too(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    _, host_t = sec_transports
    anonymous = MemoryDriver(broker, user_id="")
    client = RPCClient(
        host_t, Target(topic="nobody"), timeout=0.3, reply_from=replies_only_from("c")
    )
    call = asyncio.create_task(client.call(None, "x"))
    await eventually(lambda: host_t.replies._waiters, 2.0, interval=0.005)
    (msg_id,) = host_t.replies._waiters
    await anonymous.publish(DEFAULT_EXCHANGE, host_t.replies.queue_name, reply_body(msg_id, 1))
    with pytest.raises(MessagingTimeout):
        await call
    assert host_t.stats()["forged_replies"] == 1


async def test_forged_heartbeats_do_not_keep_a_call_alive(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    _, host_t = sec_transports
    mallory = MemoryDriver(broker, user_id="host-2")
    client = RPCClient(
        host_t,
        Target(topic="silent"),
        timeout=5.0,
        call_monitor_timeout=0.3,
        reply_from=replies_only_from("conductor"),
    )
    call = asyncio.create_task(client.call(None, "x"))
    await eventually(lambda: host_t.replies._waiters, 2.0, interval=0.005)
    (msg_id,) = host_t.replies._waiters
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not call.done() and loop.time() - started < 2.0:
        body = reply_body(msg_id, None, ending=False)
        await mallory.publish(DEFAULT_EXCHANGE, host_t.replies.queue_name, body)
        await asyncio.sleep(0.05)  # an attacker's pace: a stream of fake heartbeats
    with pytest.raises(MessagingTimeout, match="call-monitor"):
        await call
    assert loop.time() - started < 1.0


async def test_reply_from_gets_each_prepared_target_and_survives_prepare(
    sec_transports: tuple[Transport, Transport],
) -> None:
    conductor_t, host_t = sec_transports
    asked: list[Target] = []

    def reply_from(target: Target) -> Any:
        asked.append(target)
        return lambda login: login == "conductor"

    async with RPCServer(conductor_t, Target(topic=TOPIC, server="s1"), [Endpoint()]):
        client = RPCClient(host_t, Target(topic=TOPIC), timeout=2.0, reply_from=reply_from)
        await client.cast(None, "echo")  # casts never ask
        cctxt = client.prepare(server="s1", timeout=1.0)
        assert cctxt.reply_from is reply_from
        await cctxt.call(None, "echo", value=1)
        await cctxt.call(None, "echo", value=2)  # made once per prepared context
        await client.call(None, "echo", value=3)
    assert [(t.topic, t.server) for t in asked] == [(TOPIC, "s1"), (TOPIC, None)]


async def test_without_reply_from_any_sender_is_accepted(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    # Today's (oslo's) behaviour, for generic and interop use only.
    _, host_t = sec_transports
    other = MemoryDriver(broker, user_id="anyone")
    call = asyncio.create_task(RPCClient(host_t, Target(topic="n"), timeout=2.0).call(None, "x"))
    await eventually(lambda: host_t.replies._waiters, 2.0, interval=0.005)
    (msg_id,) = host_t.replies._waiters
    await other.publish(DEFAULT_EXCHANGE, host_t.replies.queue_name, reply_body(msg_id, 42))
    assert await call == 42
    assert host_t.stats()["forged_replies"] == 0


async def test_reply_queue_carries_the_login_and_is_exclusive(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    conductor_t, host_t = sec_transports
    async with RPCServer(conductor_t, Target(topic=TOPIC, server="s1"), [Endpoint()]):
        await RPCClient(host_t, Target(topic=TOPIC), timeout=2.0).call(None, "echo")
    name = host_t.replies.queue_name
    assert re.fullmatch(r"reply_host-1_[0-9a-f]{32}", name), name
    assert host_t.replies.spec.exclusive

    thief = MemoryDriver(broker, user_id="host-1")  # even the same login, other connection
    with pytest.raises(MessagingError, match="RESOURCE_LOCKED"):
        await thief.subscribe([host_t.replies.spec], _ignore, no_ack=True)
    with pytest.raises(MessagingError, match="RESOURCE_LOCKED"):
        await thief.declare([QueueSpec(name, exclusive=True)])
    with pytest.raises(MessagingError, match="RESOURCE_LOCKED"):
        await thief.delete_queue(name)
    assert broker.queues[name].consumers  # the owner still consumes it


async def test_exclusive_queue_disappears_with_its_connection(broker: MemoryBroker) -> None:
    owner = MemoryDriver(broker, user_id="a")
    spec = QueueSpec("excl", exclusive=True)
    await owner.declare([spec])
    await owner.close()
    assert "excl" not in broker.queues
    other = MemoryDriver(broker, user_id="b")
    await other.subscribe([spec], _ignore)  # free again


async def _ignore(delivery: Any) -> None:
    return None


async def test_listen_on_topic_false_consumes_only_its_own_queues(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    conductor_t, host_t = sec_transports
    endpoint = Endpoint()
    server = RPCServer(
        host_t, Target(topic=TOPIC, server="host-1"), [endpoint], listen_on_topic=False
    )
    async with server:
        assert TOPIC not in broker.queues
        fanout = [n for n in broker.queues if n.startswith(f"{TOPIC}_fanout_")]
        assert len(fanout) == 1
        assert re.fullmatch(rf"{TOPIC}_fanout_host-1_[0-9a-f]{{32}}", fanout[0])
        client = RPCClient(conductor_t, Target(topic=TOPIC), timeout=0.3)
        with pytest.raises(MessagingTimeout):
            await client.call(None, "echo", value="to anyone")
        assert (await client.prepare(server="host-1").call(None, "echo", value=1))["value"] == 1
        await client.prepare(fanout=True).cast(None, "echo", value="all")
        await eventually(lambda: ("echo", "all") in endpoint.calls, 2.0, interval=0.005)
    assert ("echo", "to anyone") not in endpoint.calls
