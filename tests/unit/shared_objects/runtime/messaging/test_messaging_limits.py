"""Limits before work (issue 13, point 3): size and nesting checked before any JSON decoding,
a short error reply and one short log line, counted in the server's stats."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.config import ConfigError, MessagingConfig, load_config
from shared_objects.runtime.messaging import (
    MessageTooDeep,
    MessageTooLarge,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    codec,
    expose,
    get_transport,
)
from shared_objects.runtime.messaging.limits import MessageLimits, nesting_exceeds, reply_address
from shared_objects.runtime.messaging.topology import DEFAULT_EXCHANGE

TOPIC = "conductor"
SMALL_LIMIT = 1024 * 1024  # 100,000-deep nesting (200 kB) fits: refused for its depth
DEPTH = 64


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _random_doc(rng: random.Random, depth: int) -> Any:
    # Strings full of what could fool a scanner: brackets, quotes, backslashes.
    if depth == 0:
        return rng.choice(["[", "]]", '"{', "\\", '\\"]', "x", 1, None, True, "}{"])
    if rng.random() < 0.5:
        return [_random_doc(rng, rng.randint(0, depth - 1)) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["a", "[", '"', "\\]"]) + str(i): _random_doc(rng, rng.randint(0, depth - 1))
        for i in range(rng.randint(0, 3))
    }


@pytest.mark.parametrize("seed", range(200))
def test_depth_scan_agrees_with_the_decoded_depth(seed: int) -> None:
    rng = random.Random(seed)
    doc = _random_doc(rng, rng.randint(0, 12))
    text = json.dumps(doc).encode()
    depth = _depth(doc)
    assert not nesting_exceeds(text, max(depth, 1))
    if depth > 1:
        assert nesting_exceeds(text, depth - 1)
    # The same document inside the 2.0 envelope: one level outside, its own depth inside.
    body = codec.encode_message({"args": doc})
    assert not nesting_exceeds(body, 1)


@pytest.mark.parametrize(
    "text",
    [b"[" * 100_000 + b"]" * 100_000, b"[" * 100_000, b'["' + b"\\" * 1001, b'[["]', b"]["],
)
def test_too_deep_unbalanced_or_unterminated_text_is_refused_without_decoding(
    text: bytes,
) -> None:
    started = time.perf_counter()
    assert nesting_exceeds(text, DEPTH)
    assert time.perf_counter() - started < 0.5


def test_deepest_legitimate_message_fits_the_default_with_headroom() -> None:
    """An InstanceList with flavors and security groups, as an argument (one level deeper than
    as a reply): the deepest message Fleet sends. The default leaves 4x headroom."""
    from shared_objects.objects.flavor import Flavor
    from shared_objects.objects.instance import Instance, InstanceList
    from shared_objects.objects.security_group import SecurityGroup, SecurityGroupList

    flavor = Flavor(
        id=1, flavorid="f", name="m1", vcpus=1, memory_mb=512, root_gb=1, ephemeral_gb=0
    )
    groups = SecurityGroupList(objects=[SecurityGroup(id=1, uuid=str(uuid.uuid4()), name="web")])
    instances = InstanceList(
        objects=[
            Instance(id=i, uuid=str(uuid.uuid4()), flavor=flavor, security_groups=groups)
            for i in range(3)
        ]
    )
    message = {"method": "m", "args": {"instances": instances.obj_to_primitive()}}
    inner = json.dumps(message).encode()
    assert _depth(message) == 12
    assert not nesting_exceeds(inner, 12) and nesting_exceeds(inner, 11)
    assert MessagingConfig().max_message_depth >= 4 * 12 + 16


def test_reply_address_found_in_head_or_tail_window_only() -> None:
    inner = {"method": "m", "args": {"blob": "y" * 300_000}, "_msg_id": "ab" * 16}
    inner["_reply_q"] = "reply_host-1_" + "cd" * 16
    body = codec.encode_message(inner)
    assert reply_address(body) == ("reply_host-1_" + "cd" * 16, "ab" * 16)
    # Only the bounded windows are looked at: keys buried in the middle are not found.
    middle = b"x" * 200_000 + b'"_msg_id": "a", "_reply_q": "reply_x_' + b"0" * 32 + b'"'
    assert reply_address(middle + b"x" * 200_000) is None


def test_limits_are_validated_config_options() -> None:
    assert (
        load_config({"FLEET_MESSAGING__MAX_MESSAGE_BYTES": "1048576"}).messaging.max_message_bytes
        == 1048576
    )
    with pytest.raises(ConfigError, match="MAX_MESSAGE_BYTES"):
        load_config({"FLEET_MESSAGING__MAX_MESSAGE_BYTES": "100"})
    with pytest.raises(ConfigError, match="MAX_MESSAGE_DEPTH"):
        load_config({"FLEET_MESSAGING__MAX_MESSAGE_DEPTH": "2"})


class Endpoint:
    @expose
    async def echo(self, ctxt: RequestContext, value: Any) -> Any:
        return value

    @expose
    async def blob(self, ctxt: RequestContext, size: int) -> str:
        return "z" * size


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Transport, Transport, RPCServer]]:
    config = MessagingConfig(
        transport_url=f"memory://limits-{uuid.uuid4().hex[:8]}",
        control_exchange="fleet-limits",
        max_message_bytes=SMALL_LIMIT,
        max_message_depth=DEPTH,
    )
    async with get_transport(config) as server_t, get_transport(config) as client_t:
        async with RPCServer(server_t, Target(topic=TOPIC, server="c1"), [Endpoint()]) as server:
            yield server_t, client_t, server


def _hostile_request(client_t: Transport, msg_id: str, args: Any) -> bytes:
    # Hand-built like an attacker would (the client refuses to send what is too large).
    return codec.encode_message(
        {
            "method": "echo",
            "args": {"value": args},
            "_msg_id": msg_id,
            "_reply_q": client_t.replies.queue_name,
        }
    )


async def _refused_call(
    client_t: Transport, server: RPCServer, body: bytes, msg_id: str
) -> BaseException:
    await client_t.replies.ensure_listening()
    future = client_t.replies.register(msg_id)
    try:
        exchange = client_t.topology.control_exchange(None)
        await client_t.driver.publish(exchange, TOPIC, body)
        async with asyncio.timeout(5):
            reply = await future
    finally:
        client_t.replies.unregister(msg_id)
    return codec.deserialize_remote_exception(reply["failure"], ())


@pytest.mark.parametrize(
    ("make_args", "error", "reason"),
    [
        (lambda: "x" * (SMALL_LIMIT + 1), MessageTooLarge, "too_large"),
        (lambda: json.loads("[" * 100_000 + "]" * 100_000), None, "too_deep"),
    ],
    ids=["16x-too-large", "100000-deep"],
)
async def test_hostile_request_gets_a_short_error_reply_and_one_short_log_line(
    pair: tuple[Transport, Transport, RPCServer], make_args: Any, error: Any, reason: str
) -> None:
    _, client_t, server = pair
    msg_id = uuid.uuid4().hex
    if reason == "too_deep":
        # json cannot even build it: write the nesting by hand.
        body = (
            b'{"oslo.version": "2.0", "oslo.message": "{\\"method\\": \\"echo\\", '
            b'\\"args\\": {\\"value\\": ' + b"[" * 100_000 + b"]" * 100_000 + b"}, "
            b'\\"_msg_id\\": \\"'
            + msg_id.encode()
            + b'\\", \\"_reply_q\\": \\"'
            + client_t.replies.queue_name.encode()
            + b'\\"}"}'
        )
        error = MessageTooDeep
    else:
        body = _hostile_request(client_t, msg_id, make_args())
    with capture_logs() as logs:
        remote = await _refused_call(client_t, server, body, msg_id)
    assert isinstance(remote, error), repr(remote)
    assert len(str(remote)) < 200
    refused = [e for e in logs if e["event"] == "rpc_message_refused"]
    assert len(refused) == 1 and refused[0]["reason"] == reason and refused[0]["replied"]
    # No body, no traceback, bounded: every line the server logged is short.
    assert all(len(repr(e)) < 600 for e in logs), [len(repr(e)) for e in logs]
    assert server.stats()["dropped"] == {reason: 1}
    # And the server still serves.
    client = RPCClient(client_t, Target(topic=TOPIC), timeout=5)
    assert await client.call(RequestContext(), "echo", value=[1, [2]]) == [1, [2]]


async def test_client_refuses_to_send_a_request_over_the_limit(
    pair: tuple[Transport, Transport, RPCServer],
) -> None:
    _, client_t, server = pair
    client = RPCClient(client_t, Target(topic=TOPIC), timeout=5)
    with pytest.raises(MessageTooLarge, match="max_message_bytes"):
        await client.call(RequestContext(), "echo", value="x" * SMALL_LIMIT)
    with pytest.raises(MessageTooLarge):
        await client.cast(RequestContext(), "echo", value="x" * SMALL_LIMIT)
    assert server.stats()["dropped"] == {}


async def test_reply_over_the_limit_fails_the_call_at_once(
    pair: tuple[Transport, Transport, RPCServer],
) -> None:
    _, client_t, server = pair
    client = RPCClient(client_t, Target(topic=TOPIC), timeout=30)
    started = time.monotonic()
    with pytest.raises(MessageTooLarge):
        await client.call(RequestContext(), "blob", size=SMALL_LIMIT * 2)
    assert time.monotonic() - started < 2
    assert server.stats()["dropped"] == {"reply_too_large": 1}


async def test_oversize_reply_from_the_wire_is_refused_unread_and_fails_its_call(
    pair: tuple[Transport, Transport, RPCServer],
) -> None:
    """What a peer without the server-side check (or a hostile one) sends: the caller does not
    decode it, finds the msg_id in the tail and fails that call at once."""
    server_t, client_t, _ = pair
    client = RPCClient(client_t, Target(topic="nobody-home"), timeout=30)
    call = asyncio.create_task(client.call(RequestContext(), "x"))
    await asyncio.sleep(0)  # the call registers its waiter, then waits for a queue to appear
    (msg_id,) = client_t.replies._waiters
    big = codec.encode_message(
        {"result": "r" * (SMALL_LIMIT * 2), "failure": None, "ending": True, "_msg_id": msg_id}
    )
    with capture_logs() as logs:
        await server_t.driver.publish(DEFAULT_EXCHANGE, client_t.replies.queue_name, big)
        with pytest.raises(MessageTooLarge):
            await asyncio.wait_for(call, 5)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["reply_refused_unreadable"]
    assert client_t.stats()["refused_replies"] == 1


def test_default_limit_fits_a_big_instance_list_page() -> None:
    limits = MessageLimits(MessagingConfig().max_message_bytes, MessagingConfig().max_message_depth)
    page = [
        {"uuid": str(uuid.uuid4()), "name": f"vm{i}", "flavor": {"vcpus": 1}} for i in range(5000)
    ]
    limits.check(codec.encode_message({"result": page, "failure": None, "ending": True}))
