"""Issue 11 in the RPC runtime, on the in-memory transport: unpredictable ids, the authorizer hook,
the user_id requirement, reply authentication, exclusive login-named reply queues, and servers
that stay off the shared topic queue."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from shared_objects.config import MessagingConfig
from shared_objects.context import RequestContext
from shared_objects.messaging import (
    MemoryBroker,
    MessagingError,
    MessagingTimeout,
    NoSuchMethod,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    codec,
    expose,
    get_transport,
    ids,
)
from shared_objects.messaging.authorization import Authorizer, ReplyFrom
from shared_objects.messaging.exceptions import (
    RequestRefused,
    Unauthenticated,
    UncoveredMethods,
)
from shared_objects.messaging.memory import MemoryDriver
from shared_objects.messaging.topology import DEFAULT_EXCHANGE, QueueSpec
from shared_objects.testing.eventually import eventually

TOPIC = "compute"


def _config(user: str) -> MessagingConfig:
    return MessagingConfig(transport_url=f"memory://{user}@sec/", control_exchange="fleet-sec")


class Endpoint:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.release = asyncio.Event()
        self.release.set()

    @expose
    async def echo(self, ctxt: RequestContext, value: Any = None) -> dict[str, Any]:
        self.calls.append(("echo", value))
        await self.release.wait()
        return {
            "value": value,
            "caller": ctxt.caller,
            "is_admin": ctxt.is_admin,
            "roles": ctxt.roles,
            "extra": ctxt.extra,
        }

    @expose
    async def delete_everything(self, ctxt: RequestContext) -> str:
        self.calls.append(("delete_everything", None))
        return "deleted"


class AdminEndpoint:
    target = Target(namespace="admin", version="1.0")

    @expose
    async def reset(self, ctxt: RequestContext) -> str:
        return "reset"


class RecordingSerializer:
    """Counts deserialisations: a refused request must never reach them."""

    def __init__(self) -> None:
        self.deserialized: list[Any] = []

    async def serialize_entity(self, ctxt: RequestContext, entity: Any) -> Any:
        return entity

    async def deserialize_entity(self, ctxt: RequestContext, primitive: Any) -> Any:
        self.deserialized.append(primitive)
        return primitive


class TablePolicy:
    """A minimal authorizer: (namespace, method) -> logins allowed."""

    def __init__(self, table: dict[tuple[str | None, str], set[str]]) -> None:
        self.table = table
        self.seen: list[tuple[str | None, str | None, bool, list[str]]] = []

    def covers(self, namespace: str | None, method: str) -> bool:
        return (namespace, method) in self.table

    def authorize(self, ctxt: RequestContext, namespace: str | None, method: str) -> None:
        self.seen.append((ctxt.caller, namespace, ctxt.is_admin, list(ctxt.roles)))
        if ctxt.caller not in self.table[(namespace, method)]:
            raise RequestRefused(f"{ctxt.caller} may not call {method}")


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def transports(broker: MemoryBroker) -> AsyncIterator[tuple[Transport, Transport]]:
    """(server transport as login 'conductor', client transport as login 'host-1')."""
    server_t = get_transport(_config("conductor"), memory_broker=broker)
    client_t = get_transport(_config("host-1"), memory_broker=broker)
    async with server_t, client_t:
        yield server_t, client_t


# -- 1. ids ------------------------------------------------------------------------------------


def test_ids_come_from_secrets_not_a_seedable_prng(monkeypatch: pytest.MonkeyPatch) -> None:
    made = iter(f"{n:032x}" for n in range(1000))
    monkeypatch.setattr(ids.secrets, "token_hex", lambda nbytes: next(made))
    assert ids.new_id() == f"{0:032x}"
    assert not hasattr(ids, "random") and not hasattr(ids, "_random")


def test_ids_are_32_hex_digits_and_distinct() -> None:
    made = [ids.new_id() for _ in range(2000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    assert len(set(made)) == len(made)


async def test_msg_id_and_unique_id_of_a_call_come_from_secrets(
    broker: MemoryBroker, transports: tuple[Transport, Transport], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, client_t = transports
    sent: list[dict[str, Any]] = []
    spy = MemoryDriver(broker, user_id="spy")
    await spy.subscribe(
        [client_t.topology.topic_queue(client_t.topology.control_exchange(), "spied")],
        lambda d: _collect(sent, d),
        no_ack=True,
    )
    made = iter(f"{n:032x}" for n in range(1000))
    monkeypatch.setattr(ids.secrets, "token_hex", lambda nbytes: next(made))
    with pytest.raises(MessagingTimeout):
        await RPCClient(client_t, Target(topic="spied"), timeout=0.1).call(None, "x")
    assert len(sent) == 1
    assert {sent[0]["_msg_id"], sent[0]["_unique_id"]} == {f"{0:032x}", f"{1:032x}"}


async def _collect(into: list[dict[str, Any]], delivery: Any) -> None:
    into.append(codec.decode_message(delivery.body))


# -- 2. the authorizer hook ----------------------------------------------------------------------


def test_authorizer_must_cover_every_exposed_method(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, _ = transports
    policy = TablePolicy({(None, "echo"): {"host-1"}})
    with pytest.raises(UncoveredMethods) as raised:
        RPCServer(
            server_t,
            Target(topic=TOPIC, server="s1"),
            [Endpoint(), AdminEndpoint()],
            authorizer=policy,
        )
    assert raised.value.uncovered == [(None, "delete_everything"), ("admin", "reset")]
    assert "delete_everything" in str(raised.value) and "admin.reset" in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert isinstance(policy, Authorizer)  # the Protocol is runtime-checkable


async def test_refused_call_returns_the_error_and_runs_nothing(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    endpoint = Endpoint()
    serializer = RecordingSerializer()
    policy = TablePolicy({(None, "echo"): {"host-1"}, (None, "delete_everything"): {"operator"}})
    server = RPCServer(
        server_t,
        Target(topic=TOPIC, server="s1"),
        [endpoint],
        serializer=serializer,
        authorizer=policy,
    )
    async with server:
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        with capture_logs() as logs:
            with pytest.raises(RequestRefused, match="host-1 may not call delete_everything"):
                await client.call(None, "delete_everything")
            await client.cast(None, "delete_everything")
            await eventually(
                lambda: server.stats()["calls"] == {"delete_everything:forbidden": 2}, 2.0
            )
        assert endpoint.calls == []
        assert serializer.deserialized == []
        assert server.stats()["calls"] == {"delete_everything:forbidden": 2}
        # The authorizer writes the audit line; the server logs no error or traceback.
        assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
        assert not any("exc_info" in e for e in logs)

        # Allowed: runs, arguments deserialised after the check.
        assert (await client.call(None, "echo", value=7))["value"] == 7
        assert endpoint.calls == [("echo", 7)]
        assert serializer.deserialized == [7]
    assert [s[:2] for s in policy.seen] == [
        ("host-1", None),
        ("host-1", None),
        ("host-1", None),
    ]


async def test_unknown_methods_fail_before_the_authorizer_is_asked(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    policy = TablePolicy({(None, "echo"): set(), (None, "delete_everything"): set()})
    async with RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [Endpoint()], authorizer=policy
    ) as server:
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        with pytest.raises(NoSuchMethod):
            await client.call(None, "no_such_thing")
        assert policy.seen == []
        assert server.stats()["calls"] == {"<unknown>:client_error": 1}


async def test_authorizer_sees_the_namespace(transports: tuple[Transport, Transport]) -> None:
    server_t, client_t = transports
    policy = TablePolicy({("admin", "reset"): {"host-1"}})
    async with RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [AdminEndpoint()], authorizer=policy
    ):
        client = RPCClient(client_t, Target(topic=TOPIC, namespace="admin"), timeout=2.0)
        assert await client.call(None, "reset") == "reset"
    assert policy.seen == [("host-1", "admin", False, [])]


async def test_a_failing_authorizer_refuses_and_is_logged_as_a_bug(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    endpoint = Endpoint()

    class Broken:
        def covers(self, namespace: str | None, method: str) -> bool:
            return True

        def authorize(self, ctxt: RequestContext, namespace: str | None, method: str) -> None:
            raise KeyError("policy table is broken")

    async with RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [endpoint], authorizer=Broken()
    ) as server:
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        with capture_logs() as logs, pytest.raises(KeyError):
            await client.call(None, "echo", value=1)
        assert endpoint.calls == []
        assert server.stats()["calls"] == {"echo:error": 1}
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["rpc_authorizer_failed"]


async def test_wire_is_admin_and_roles_are_never_trusted(
    transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = transports
    policy = TablePolicy({(None, "echo"): {"host-1"}, (None, "delete_everything"): set()})
    async with RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [Endpoint()], authorizer=policy
    ):
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        claimed = RequestContext(is_admin=True, roles=["admin"], caller="conductor")
        result = await client.call(claimed, "echo", value=1)
    assert result["caller"] == "host-1"
    assert (result["is_admin"], result["roles"]) == (False, [])
    assert result["extra"] == {}  # the claims are dropped, not passed on by onward calls
    assert policy.seen == [("host-1", None, False, [])]


# -- 3. requests without a broker-validated user_id ----------------------------------------------


async def test_request_without_user_id_is_refused_when_required(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    server_t, _ = transports
    endpoint = Endpoint()
    anonymous = Transport(_config("anon"), MemoryDriver(broker, user_id=""))
    async with (
        anonymous,
        RPCServer(
            server_t, Target(topic=TOPIC, server="s1"), [endpoint], require_user_id=True
        ) as server,
    ):
        client = RPCClient(anonymous, Target(topic=TOPIC), timeout=2.0)
        with capture_logs() as logs:
            with pytest.raises(Unauthenticated, match="no broker-validated user_id"):
                await client.call(None, "echo", value=1)
            await client.cast(None, "echo", value=2)
            await eventually(lambda: server.stats()["dropped"].get("no_user_id") == 2, 2.0)
        assert endpoint.calls == []
        refused = [e for e in logs if e["event"] == "rpc_request_refused"]
        assert [(e["log_level"], e["reason"], e["queue"]) for e in refused] == [
            ("warning", "no_user_id", TOPIC),
            ("warning", "no_user_id", TOPIC),
        ]
        assert [e["replied"] for e in refused] == [True, False]
        assert server.stats()["calls"] == {}


async def test_request_without_user_id_is_served_by_default(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    # What an oslo.messaging peer looks like: it never sets user_id.
    server_t, _ = transports
    anonymous = Transport(_config("anon"), MemoryDriver(broker, user_id=""))
    async with anonymous, RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()]):
        result = await RPCClient(anonymous, Target(topic=TOPIC), timeout=2.0).call(
            None, "echo", value=1
        )
    assert result["caller"] is None


# -- 4. replies only from the expected login ---------------------------------------------------


def _reply_body(msg_id: str, result: Any, *, ending: bool = True) -> bytes:
    return codec.encode_message(
        {
            "result": result,
            "failure": None,
            "ending": ending,
            "_msg_id": msg_id,
            "_unique_id": ids.new_id(),
        }
    )


def _expect(*logins: str) -> ReplyFrom:
    def reply_from(target: Target) -> Any:
        return lambda login: login in logins

    return reply_from


async def test_forged_reply_is_ignored_and_the_genuine_one_returned(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    conductor_t, host_t = transports
    endpoint = Endpoint()
    endpoint.release.clear()
    mallory = MemoryDriver(broker, user_id="host-2")
    async with RPCServer(conductor_t, Target(topic="conductor", server="c1"), [endpoint]):
        client = RPCClient(
            host_t, Target(topic="conductor"), timeout=2.0, reply_from=_expect("conductor")
        )
        call = asyncio.create_task(client.call(None, "echo", value="genuine"))
        await eventually(lambda: endpoint.calls, 2.0, interval=0.005)
        (msg_id,) = host_t.replies._waiters
        reply_q = host_t.replies.queue_name
        with capture_logs() as logs:
            await mallory.publish(DEFAULT_EXCHANGE, reply_q, _reply_body(msg_id, "forged"))
            await mallory.publish(
                DEFAULT_EXCHANGE, reply_q, _reply_body(msg_id, None, ending=False)
            )
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
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    _, host_t = transports
    anonymous = MemoryDriver(broker, user_id="")
    client = RPCClient(host_t, Target(topic="nobody"), timeout=0.3, reply_from=_expect("c"))
    call = asyncio.create_task(client.call(None, "x"))
    await eventually(lambda: host_t.replies._waiters, 2.0, interval=0.005)
    (msg_id,) = host_t.replies._waiters
    await anonymous.publish(DEFAULT_EXCHANGE, host_t.replies.queue_name, _reply_body(msg_id, 1))
    with pytest.raises(MessagingTimeout):
        await call
    assert host_t.stats()["forged_replies"] == 1


async def test_forged_heartbeats_do_not_keep_a_call_alive(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    _, host_t = transports
    mallory = MemoryDriver(broker, user_id="host-2")
    client = RPCClient(
        host_t,
        Target(topic="silent"),
        timeout=5.0,
        call_monitor_timeout=0.3,
        reply_from=_expect("conductor"),
    )
    call = asyncio.create_task(client.call(None, "x"))
    await eventually(lambda: host_t.replies._waiters, 2.0, interval=0.005)
    (msg_id,) = host_t.replies._waiters
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not call.done() and loop.time() - started < 2.0:
        body = _reply_body(msg_id, None, ending=False)
        await mallory.publish(DEFAULT_EXCHANGE, host_t.replies.queue_name, body)
        await asyncio.sleep(0.05)  # an attacker's pace: a stream of fake heartbeats
    with pytest.raises(MessagingTimeout, match="call-monitor"):
        await call
    assert loop.time() - started < 1.0


async def test_reply_from_gets_each_prepared_target_and_survives_prepare(
    transports: tuple[Transport, Transport],
) -> None:
    conductor_t, host_t = transports
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
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    # Today's (oslo's) behaviour, for generic and interop use only.
    _, host_t = transports
    other = MemoryDriver(broker, user_id="anyone")
    call = asyncio.create_task(RPCClient(host_t, Target(topic="n"), timeout=2.0).call(None, "x"))
    await eventually(lambda: host_t.replies._waiters, 2.0, interval=0.005)
    (msg_id,) = host_t.replies._waiters
    await other.publish(DEFAULT_EXCHANGE, host_t.replies.queue_name, _reply_body(msg_id, 42))
    assert await call == 42
    assert host_t.stats()["forged_replies"] == 0


# -- 5. exclusive reply queues named after the login -------------------------------------------


async def test_reply_queue_carries_the_login_and_is_exclusive(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    conductor_t, host_t = transports
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


# -- 6. servers off the shared topic queue -----------------------------------------------------


async def test_listen_on_topic_false_consumes_only_its_own_queues(
    broker: MemoryBroker, transports: tuple[Transport, Transport]
) -> None:
    conductor_t, host_t = transports
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
