"""``fleetctl broker setup`` on a private RabbitMQ node, and what the broker then enforces.

One node for the module; ``fleetctl broker setup`` runs against it through the node's own
rabbitmqctl. Then, one by one, a hostile host login tries what issue 12 says the broker must
refuse (each refusal is the broker's: ACCESS_REFUSED or PRECONDITION_FAILED on the channel),
and a flood of casts to a stopped agent stops at the queue's length limit with a clear error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import pytest_asyncio

from conductor.tools.fleetctl import build_parser
from conductor.tools.fleetctl.broker import setup
from shared_objects.context import RequestContext
from shared_objects.runtime.config import FleetConfig, MessagingConfig
from shared_objects.runtime.messaging import (
    MessageRejected,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.testing.broker_logins import NodeCtl
from shared_objects.testing.broker_probe import ChannelOp, channel_outcome, ignore_message
from shared_objects.testing.eventually import eventually
from shared_objects.testing.rabbit_node import RabbitNode

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl"),
]

VHOST = "fleet"
VICTIM, HOSTILE = "compute-1", "compute-2"
HOSTS = [VICTIM, HOSTILE, "compute-3"]
FLOOD_LIMIT = 50


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node() -> AsyncIterator[RabbitNode]:
    try:
        node = RabbitNode()
        await node.start()
    except Exception as exc:  # no rabbitmq-server scripts on this machine
        pytest.skip(f"no private RabbitMQ node: {exc}")
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broker-secrets") / "secrets"


def _cfg(node: RabbitNode) -> FleetConfig:
    cfg = FleetConfig(host="fleetctl")
    cfg.messaging.transport_url = f"rabbit://unused:unused@127.0.0.1:{node.port}/{VHOST}"
    return cfg


def _args(secrets_dir: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        [
            "broker",
            "setup",
            "--hosts",
            ",".join(HOSTS[:2]),
            "--hosts",
            HOSTS[2],
            "--conductors",
            "1",
            "--operators",
            "alice",
            "--secrets-dir",
            str(secrets_dir),
            "--rpc-max-length",
            str(FLOOD_LIMIT),
            *extra,
        ]
    )


async def _run(
    node: RabbitNode, secrets_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> list[str]:
    args = _args(secrets_dir, *extra)
    assert await setup(args, _cfg(node), ctl=NodeCtl(node)) == 0
    return capsys.readouterr().out.splitlines()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def set_up(node: RabbitNode, secrets_dir: Path) -> Path:
    """The node after one real ``fleetctl broker setup`` (module-wide)."""
    args = _args(secrets_dir)
    assert await setup(args, _cfg(node), ctl=NodeCtl(node)) == 0
    return secrets_dir


def _json(text: str) -> Any:
    """The JSON document of a rabbitmqctl output (after its "Listing ..." banner)."""
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.loads(text[start:])


def _url(node: RabbitNode, secrets_dir: Path, login: str) -> str:
    password = (secrets_dir / login).read_text().strip()
    return f"rabbit://{login}:{password}@127.0.0.1:{node.port}/{VHOST}"


async def test_setup_twice_changes_nothing_the_second_time_and_dry_run_lists_the_same(
    node: RabbitNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its own vhost and secrets, so the module's set-up node is not involved.
    secrets_dir = tmp_path / "s"
    extra = ("--vhost", "fleet-idem")
    dry = await _run(node, secrets_dir, capsys, *extra, "--dry-run")
    assert not secrets_dir.exists()  # a dry run writes nothing
    first = await _run(node, secrets_dir, capsys, *extra)
    assert dry[:-1] == first[:-1], (dry, first)  # the same actions, in the same order
    assert dry[-1].startswith("dry run: ") and first[-1].endswith(
        f"passwords of new logins in {secrets_dir}"
    )
    with capsys.disabled():
        print("\n".join(first))
    actions = first[:-1]
    assert "create vhost fleet-idem" in actions
    for login in ("fleet-conductor-1", "fleet-operator-alice", *(f"fleet-host-{h}" for h in HOSTS)):
        assert any(a.startswith(f"create user {login} ") for a in actions), login
        path = secrets_dir / login
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    assert {a.split()[2] for a in actions if a.startswith("create policy")} == {
        "fleet-rpc",
        "fleet-replies",
        "fleet-fanout",
        "fleet-notifications",
    }
    assert "create exchange fleet_reply (topic, durable=True)" in actions

    started = time.monotonic()
    second = await _run(node, secrets_dir, capsys, *extra)
    assert second == [
        f"nothing to change: vhost fleet-idem already set up for {2 + len(HOSTS)} login(s)"
    ]
    with capsys.disabled():
        print(f"second run: {second[0]} ({time.monotonic() - started:.2f}s)")
    assert await _run(node, secrets_dir, capsys, *extra, "--dry-run") == [
        "dry run: 0 change(s) not applied"
    ]

    # One more host and a changed limit: exactly those changes.
    more = await _run(
        node, secrets_dir, capsys, *extra, "--hosts", "compute-4", "--agent-max-channels", "32"
    )
    assert any(a.startswith("create user fleet-host-compute-4 ") for a in more)
    changed_limits = [a for a in more if a.startswith("update user fleet-host-compute-")]
    assert len(changed_limits) == len(HOSTS) and all("limits" in a for a in changed_limits)
    # The broker holds what was printed: limits and policies included.
    limits = _json(await node.ctl("list_user_limits", "--user", "fleet-host-compute-4"))
    assert limits == {"max-channels": 32, "max-connections": 8}
    policies = await node.ctl("list_policies", "-p", "fleet-idem", "--formatter", "json")
    by_name = {p["name"]: p for p in _json(policies)}
    rpc = by_name["fleet-rpc"]["definition"]
    rpc = json.loads(rpc) if isinstance(rpc, str) else rpc
    assert rpc["overflow"] == "reject-publish" and rpc["max-length"] == FLOOD_LIMIT


async def test_a_password_file_given_for_an_existing_login_is_applied(
    node: RabbitNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets_dir = tmp_path / "s"
    await _run(node, secrets_dir, capsys, "--vhost", "fleet-pw")
    (secrets_dir / "fleet-operator-alice").write_text("a-new-password\n")
    out = await _run(node, secrets_dir, capsys, "--vhost", "fleet-pw")
    assert out[0] == "update user fleet-operator-alice (operator): password", out
    await node.ctl("authenticate_user", "fleet-operator-alice", "a-new-password")


# --- what a hostile host login is refused --------------------------------------------------


async def _connect(url: str) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(parse_transport_url(url).hosts[0], timeout=10)


class _Counter:
    def __init__(self) -> None:
        self.seen: list[int] = []

    @expose
    async def whoami(self, ctxt: RequestContext) -> str | None:
        return ctxt.caller

    @expose
    async def note(self, ctxt: RequestContext, n: int) -> None:
        self.seen.append(n)


def _messaging(url: str) -> MessagingConfig:
    return MessagingConfig(transport_url=url, control_exchange="fleet")


async def test_hostile_host_is_refused_by_the_broker_one_attack_at_a_time(
    node: RabbitNode, set_up: Path
) -> None:
    url = functools.partial(_url, node, set_up)
    victim, hostile = f"fleet-host-{VICTIM}", f"fleet-host-{HOSTILE}"
    async with (
        get_transport(_messaging(url(victim))) as victim_t,
        get_transport(_messaging(url(hostile))) as hostile_t,
        get_transport(_messaging(url("fleet-conductor-1"))) as conductor_t,
        RPCServer(
            victim_t, Target(topic="compute", server=VICTIM), [_Counter()], listen_on_topic=False
        ),
        RPCServer(
            hostile_t, Target(topic="compute", server=HOSTILE), [_Counter()], listen_on_topic=False
        ),
    ):
        # The fleet works under these rights: a conductor calls both agents, they answer
        # through the reply exchange; an agent calls its live-migration peer.
        for host in (VICTIM, HOSTILE):
            client = RPCClient(conductor_t, Target(topic="compute", server=host), timeout=10)
            assert await client.call(RequestContext(), "whoami") == "fleet-conductor-1"
        peer = RPCClient(victim_t, Target(topic="compute", server=HOSTILE), timeout=10)
        assert await peer.call(RequestContext(), "whoami") == victim
        victim_reply = victim_t.replies.queue_name
        conductor_reply = conductor_t.replies.queue_name
        # A non-exclusive queue under the victim's reply name (as with quorum reply queues):
        # only permissions protect it, not exclusivity.
        shared_reply = f"reply_{victim}_{secrets.token_hex(16)}"
        setup_conn = await _connect(url("fleet-conductor-1"))
        channel = await setup_conn.channel()
        await channel.declare_queue(shared_reply)

        connection = await _connect(url(hostile))
        try:
            results: dict[str, str] = {}

            async def consume(name: str, ch: aio_pika.abc.AbstractChannel) -> None:
                queue = await ch.get_queue(name, ensure=False)
                await queue.consume(ignore_message)

            async def bind(
                queue: str, exchange: str, key: str, ch: aio_pika.abc.AbstractChannel
            ) -> None:
                await (await ch.get_underlay_channel()).queue_bind(queue, exchange, routing_key=key)

            async def own_queue_bound(
                exchange: str, key: str, ch: aio_pika.abc.AbstractChannel
            ) -> None:
                mine = f"reply_{hostile}_{secrets.token_hex(16)}"
                await ch.declare_queue(mine, exclusive=True)
                await (await ch.get_underlay_channel()).queue_bind(mine, exchange, routing_key=key)

            async def publish(exchange: str, key: str, ch: aio_pika.abc.AbstractChannel) -> None:
                target = (
                    ch.default_exchange
                    if not exchange
                    else await ch.get_exchange(exchange, ensure=False)
                )
                await target.publish(aio_pika.Message(b"{}", user_id=hostile), routing_key=key)

            async def declare(
                name: str, args: dict[str, Any], ch: aio_pika.abc.AbstractChannel
            ) -> None:
                await ch.declare_queue(name, arguments=args)

            attacks: dict[str, ChannelOp] = {
                # consume another login's reply or compute queue
                "consume victim's reply queue": functools.partial(consume, victim_reply),
                "consume victim's non-exclusive reply queue": functools.partial(
                    consume, shared_reply
                ),
                "consume conductor's reply queue": functools.partial(consume, conductor_reply),
                "consume victim's compute queue": functools.partial(consume, f"compute.{VICTIM}"),
                "consume conductor queue": functools.partial(consume, "conductor"),
                # bind to another login's replies or topics
                "bind own queue to victim's replies": functools.partial(
                    own_queue_bound, "fleet_reply", victim_reply
                ),
                "bind own queue to conductor's replies": functools.partial(
                    own_queue_bound, "fleet_reply", conductor_reply
                ),
                "bind own queue to victim's topic": functools.partial(
                    own_queue_bound, "fleet", f"compute.{VICTIM}"
                ),
                "bind own queue to every reply": functools.partial(
                    own_queue_bound, "fleet_reply", "#"
                ),
                "bind victim's reply queue": functools.partial(
                    bind, shared_reply, "fleet_reply", shared_reply
                ),
                "bind victim's compute queue": functools.partial(
                    bind, f"compute.{VICTIM}", "fleet", f"compute.{HOSTILE}"
                ),
                # publish into another host's queues by any exchange
                "default exchange -> victim's compute queue": functools.partial(
                    publish, "", f"compute.{VICTIM}"
                ),
                "default exchange -> victim's reply queue": functools.partial(
                    publish, "", victim_reply
                ),
                "default exchange -> conductor queue": functools.partial(publish, "", "conductor"),
                "reply exchange -> victim's compute queue": functools.partial(
                    publish, "fleet_reply", f"compute.{VICTIM}"
                ),
                "reply exchange -> an operator's reply queue": functools.partial(
                    publish, "fleet_reply", f"reply_fleet-operator-alice_{secrets.token_hex(16)}"
                ),
                "control exchange -> victim's reply queue": functools.partial(
                    publish, "fleet", victim_reply
                ),
                "fanout exchange -> every agent": functools.partial(publish, "compute_fanout", ""),
                # declare Fleet's queues with other arguments
                "declare conductor queue unbounded": functools.partial(
                    declare, "conductor", {"x-max-length": 10**9}
                ),
                "declare victim's compute queue": functools.partial(
                    declare, f"compute.{VICTIM}", {}
                ),
                "redeclare own compute queue unbounded": functools.partial(
                    declare, f"compute.{HOSTILE}", {"x-max-length": 10**9}
                ),
                "redeclare reply exchange as direct": lambda ch: ch.declare_exchange(
                    "fleet_reply", aio_pika.ExchangeType.DIRECT, durable=True
                ),
            }
            for name, attack in attacks.items():
                results[name] = await channel_outcome(connection, attack)
            print(json.dumps(results, indent=1))
            refused = {"ACCESS_REFUSED", "PRECONDITION_FAILED"}
            assert {k: v for k, v in results.items() if v not in refused} == {}
            assert results["redeclare own compute queue unbounded"] == "PRECONDITION_FAILED"
            assert results["redeclare reply exchange as direct"] == "PRECONDITION_FAILED"
            assert results["default exchange -> victim's compute queue"] == "ACCESS_REFUSED"
        finally:
            await connection.close()
            await channel.queue_delete(shared_reply)
            await setup_conn.close()

        # And the fleet still works after all that.
        client = RPCClient(conductor_t, Target(topic="compute", server=VICTIM), timeout=10)
        assert await client.call(RequestContext(), "whoami") == "fleet-conductor-1"


# --- a flood of casts to a stopped agent ----------------------------------------------------


async def test_flood_of_casts_to_a_stopped_agent_stops_at_the_limit_with_a_clear_error(
    node: RabbitNode, set_up: Path
) -> None:
    url = functools.partial(_url, node, set_up)
    agent_login, host = "fleet-host-compute-3", "compute-3"
    counter = _Counter()
    async with (
        get_transport(_messaging(url(agent_login))) as agent_t,
        get_transport(_messaging(url("fleet-conductor-1"))) as conductor_t,
    ):
        target = Target(topic="compute", server=host)
        server = RPCServer(agent_t, target, [counter], listen_on_topic=False)
        await server.start()
        await server.stop()  # the agent is down; its queue stays

        client = RPCClient(conductor_t, target, timeout=10)
        sent, error = 0, None
        started = time.monotonic()
        for n in range(10 * FLOOD_LIMIT):
            try:
                await client.cast(RequestContext(), "note", n=n)
            except MessageRejected as exc:
                error = exc
                break
            sent += 1
        took = time.monotonic() - started
        assert sent == FLOOD_LIMIT, sent
        assert error is not None
        print(f"{sent} casts kept, the next refused after {took:.2f}s: {error}")
        assert str(error).startswith("queue full")
        assert f"'compute.{host}'" in str(error)
        # Every further cast and a call fail the same way at once: never a hang.
        with pytest.raises(MessageRejected, match="queue full"):
            await client.cast(RequestContext(), "note", n=-1)
        call_started = time.monotonic()
        with pytest.raises(MessageRejected, match="queue full"):
            await client.call(RequestContext(), "whoami")
        assert time.monotonic() - call_started < 5
        assert conductor_t.driver.stats()["rejected"] >= 3
        alarms = await node.ctl("eval", "rabbit_alarm:get_alarms().")
        assert alarms.strip() == "[]", alarms

        # The agent comes back and processes exactly what was kept, in order.
        async with RPCServer(agent_t, target, [counter], listen_on_topic=False):
            await eventually(lambda: len(counter.seen) >= FLOOD_LIMIT, 20)
            await asyncio.sleep(0.2)  # an absence check: nothing beyond what was kept arrives
            assert counter.seen == list(range(FLOOD_LIMIT))
            # And it is reachable again.
            assert await client.call(RequestContext(), "whoami") == "fleet-conductor-1"
