"""Issue 11 in the RPC runtime, on the in-memory transport: unpredictable ids, the authorizer hook
and the user_id requirement (replies and reply queues: ``test_messaging_security_replies.py``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from security_endpoints import (
    TOPIC,
    AdminEndpoint,
    Endpoint,
    RecordingSerializer,
    TablePolicy,
    collect_into,
    security_config,
)
from structlog.testing import capture_logs

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import (
    MemoryBroker,
    MessagingTimeout,
    NoSuchMethod,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    ids,
)
from shared_objects.runtime.messaging.authorization import Authorizer
from shared_objects.runtime.messaging.exceptions import (
    RequestRefused,
    Unauthenticated,
    UncoveredMethods,
)
from shared_objects.runtime.messaging.memory import MemoryDriver
from shared_objects.testing.eventually import eventually


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
    broker: MemoryBroker,
    sec_transports: tuple[Transport, Transport],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, client_t = sec_transports
    sent: list[dict[str, Any]] = []
    spy = MemoryDriver(broker, user_id="spy")
    await spy.subscribe(
        [client_t.topology.topic_queue(client_t.topology.control_exchange(), "spied")],
        lambda d: collect_into(sent, d),
        no_ack=True,
    )
    made = iter(f"{n:032x}" for n in range(1000))
    monkeypatch.setattr(ids.secrets, "token_hex", lambda nbytes: next(made))
    with pytest.raises(MessagingTimeout):
        await RPCClient(client_t, Target(topic="spied"), timeout=0.1).call(None, "x")
    assert len(sent) == 1
    assert {sent[0]["_msg_id"], sent[0]["_unique_id"]} == {f"{0:032x}", f"{1:032x}"}


def test_authorizer_must_cover_every_exposed_method(
    sec_transports: tuple[Transport, Transport],
) -> None:
    server_t, _ = sec_transports
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
    sec_transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = sec_transports
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
    sec_transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = sec_transports
    policy = TablePolicy({(None, "echo"): set(), (None, "delete_everything"): set()})
    async with RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [Endpoint()], authorizer=policy
    ) as server:
        client = RPCClient(client_t, Target(topic=TOPIC), timeout=2.0)
        with pytest.raises(NoSuchMethod):
            await client.call(None, "no_such_thing")
        assert policy.seen == []
        assert server.stats()["calls"] == {"<unknown>:client_error": 1}


async def test_authorizer_sees_the_namespace(sec_transports: tuple[Transport, Transport]) -> None:
    server_t, client_t = sec_transports
    policy = TablePolicy({("admin", "reset"): {"host-1"}})
    async with RPCServer(
        server_t, Target(topic=TOPIC, server="s1"), [AdminEndpoint()], authorizer=policy
    ):
        client = RPCClient(client_t, Target(topic=TOPIC, namespace="admin"), timeout=2.0)
        assert await client.call(None, "reset") == "reset"
    assert policy.seen == [("host-1", "admin", False, [])]


async def test_a_failing_authorizer_refuses_and_is_logged_as_a_bug(
    sec_transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = sec_transports
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
    sec_transports: tuple[Transport, Transport],
) -> None:
    server_t, client_t = sec_transports
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


async def test_request_without_user_id_is_refused_when_required(
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    server_t, _ = sec_transports
    endpoint = Endpoint()
    anonymous = Transport(security_config("anon"), MemoryDriver(broker, user_id=""))
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
    broker: MemoryBroker, sec_transports: tuple[Transport, Transport]
) -> None:
    # What an oslo.messaging peer looks like: it never sets user_id.
    server_t, _ = sec_transports
    anonymous = Transport(security_config("anon"), MemoryDriver(broker, user_id=""))
    async with anonymous, RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()]):
        result = await RPCClient(anonymous, Target(topic=TOPIC), timeout=2.0).call(
            None, "echo", value=1
        )
    assert result["caller"] is None
