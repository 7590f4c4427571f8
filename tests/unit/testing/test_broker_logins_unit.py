"""BrokerLogins without a broker: names, URLs, password hashes, permission regexes, batching."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from shared_objects.runtime.config import SecurityConfig, load_config
from shared_objects.runtime.identity import Identities, Role
from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.testing.broker_logins import BrokerLogins, Permissions, hash_password
from shared_objects.testing.broker_logins.ctl import _delete_users_expression

URL = "rabbit://guest:guest@127.0.0.1:5672/fleet-test-abc"
EXCHANGE = "fleet-test-0123456789ab"
HEX = "0123456789abcdef0123456789abcdef"


class FakeCtl:
    def __init__(self) -> None:
        self.imports: list[dict[str, Any]] = []
        self.deleted: list[list[str]] = []

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        self.imports.append(dict(definitions))

    async def delete_users(self, logins: Sequence[str]) -> None:
        self.deleted.append(list(logins))


def make(**kwargs: Any) -> tuple[BrokerLogins, FakeCtl]:
    ctl = FakeCtl()
    kwargs.setdefault("legacy_queue_names", False)
    kwargs.setdefault("agent_topic_queue", False)
    return BrokerLogins(URL, ctl=ctl, **kwargs), ctl


def matches(regex: str, name: str) -> bool:
    # RabbitMQ runs the regex unanchored (re:run): search, as it does.
    return re.search(regex, name) is not None


def test_password_hash_is_rabbitmq_sha256_with_a_4_byte_salt() -> None:
    salt = b"\x90\x8d\xc6\x0a"
    raw = base64.b64decode(hash_password("test12", salt))
    assert raw[:4] == salt
    assert raw[4:] == hashlib.sha256(salt + b"test12").digest()
    assert hash_password("x") != hash_password("x")  # a fresh salt each time
    with pytest.raises(ValueError):
        hash_password("x", b"12")


def test_names_follow_the_security_config_and_the_tag() -> None:
    plain, _ = make()
    assert plain.host_login("compute-1") == "fleet-host-compute-1"
    assert plain.conductor_login("1") == "fleet-conductor-1"
    assert plain.conductor_login() == "fleet-conductor"
    assert plain.operator_login() == "fleet-operator"
    assert plain.security_env() == {}

    tagged, _ = make(tag="a1b2")
    assert tagged.host_login("compute-1") == "fleet-host-a1b2-compute-1"
    assert tagged.conductor_login("2") == "fleet-conductor-a1b2-2"
    assert tagged.operator_login() == "fleet-operator-a1b2"
    env = tagged.security_env()
    assert env == {"FLEET_SECURITY__HOST_LOGIN_PREFIX": "fleet-host-a1b2-"}
    # The processes, configured from that environment, resolve the logins back.
    ids = Identities(load_config(env).security)
    assert ids.resolve(tagged.host_login("compute-1")).hosts == {"compute-1"}
    assert ids.resolve(tagged.conductor_login("2")).role is Role.CONDUCTOR
    assert ids.resolve(tagged.operator_login()).role is Role.OPERATOR


def test_a_name_outside_its_role_is_refused() -> None:
    logins, _ = make(security=SecurityConfig(conductor_logins=("cond-*",)))
    with pytest.raises(ValueError, match="would be"):
        logins.conductor_login("1")
    with pytest.raises(ValueError):
        make(tag="Not OK")


async def test_url_for_keeps_hosts_vhost_and_query() -> None:
    ctl = FakeCtl()
    logins = BrokerLogins(
        "rabbit://a:b@h1:5672,c:d@h2:5673/my%2Fvhost?ssl=1&heartbeat=5",
        ctl=ctl,
        legacy_queue_names=False,
        agent_topic_queue=False,
    )
    [login] = await logins.ensure(hosts=["compute-1"])
    url = logins.url_for(login)
    parsed = parse_transport_url(url)
    assert parsed.users == (login, login)
    assert parsed.virtual_host == "my/vhost"
    assert url.startswith(f"rabbit://{login}:{logins.password(login)}@h1:5672,{login}:")
    assert url.endswith("@h2:5673/my%2Fvhost?ssl=1&heartbeat=5")
    assert ctl.imports[0]["permissions"][0]["vhost"] == "my/vhost"
    with pytest.raises(KeyError):
        logins.url_for("fleet-host-unknown")


async def test_agent_permissions_cover_its_own_queues_only() -> None:
    logins, _ = make(tag="t1")
    await logins.ensure(hosts=["compute-1"], exchanges=[EXCHANGE])
    login = logins.host_login("compute-1")
    perm = logins.permissions(login)
    own = [
        "compute.compute-1",
        f"reply_{login}_{HEX}",
        f"compute_fanout_compute-1_{HEX}",
    ]
    for name in own:
        assert matches(perm.configure, name) and matches(perm.read, name), name
        assert matches(perm.write, name), name
    for name in (EXCHANGE, "compute_fanout"):
        assert matches(perm.configure, name) and matches(perm.read, name), name
    assert matches(perm.write, EXCHANGE) and not matches(perm.write, "amq.default")
    # Replies: declare, bind to and publish on the reply exchange; the routing keys are limited.
    assert all(matches(r, "fleet_reply") for r in (perm.configure, perm.write, perm.read))
    reply = logins.reply_topic_permissions(login)
    assert reply is not None
    assert matches(reply.read, f"reply_{login}_{HEX}")
    for key in (f"reply_fleet-host-t1-compute-2_{HEX}", f"reply_fleet-conductor-1_{HEX}", "#"):
        assert not matches(reply.read, key), key
    for key in (f"reply_fleet-host-t1-compute-2_{HEX}", f"reply_fleet-conductor-t1-1_{HEX}"):
        assert matches(reply.write, key), key
    for key in (f"reply_fleet-operator-t1_{HEX}", "conductor", "compute.compute-2", f"reply_{HEX}"):
        assert not matches(reply.write, key), key
    notifications = "versioned_notifications.info"
    assert matches(perm.configure, notifications) and matches(perm.write, notifications)
    assert not matches(perm.read, notifications)
    foreign = [
        "conductor",
        "compute",
        "compute.compute-2",
        "compute.compute-10",
        f"reply_fleet-host-t1-compute-2_{HEX}",
        f"reply_{login}x_{HEX}",
        f"reply_{HEX}",
        f"compute_fanout_compute-2_{HEX}",
        f"compute_fanout_compute-1_x_{HEX}",
        f"conductor_fanout_conductor-1_{HEX}",
        "other-exchange",
        f"x{EXCHANGE}",
    ]
    for name in foreign:
        assert not any(matches(r, name) for r in (perm.configure, perm.read)), name
        assert not matches(perm.write, name), name

    topic = logins.topic_permissions(login)
    assert topic is not None
    for key in ("conductor", "compute.compute-2", "compute.compute-1", notifications):
        assert matches(topic.write, key), key
    for key in ("conductor.c1", "compute", "anything", "compute_fanout"):
        assert not matches(topic.write, key), key
    assert matches(topic.read, "compute.compute-1") and matches(topic.read, notifications)
    for key in ("conductor", "compute.compute-2", "compute", "#", "compute.*"):
        assert not matches(topic.read, key), key


async def test_operator_and_conductor_permissions() -> None:
    logins, _ = make()
    await logins.ensure(conductors=["1"], operators=[""], exchanges=[EXCHANGE])
    assert logins.permissions("fleet-conductor-1") == Permissions(".*", ".*", ".*")
    assert logins.topic_permissions("fleet-conductor-1") is None
    perm = logins.permissions("fleet-operator")
    assert matches(perm.configure, f"reply_fleet-operator_{HEX}")
    assert matches(perm.read, f"reply_fleet-operator_{HEX}")
    assert matches(perm.write, EXCHANGE) and not matches(perm.write, "amq.default")
    assert matches(perm.write, f"reply_fleet-operator_{HEX}")  # binds it to the reply exchange
    reply = logins.reply_topic_permissions("fleet-operator")
    assert reply is not None and reply.write == "^$"
    assert matches(reply.read, f"reply_fleet-operator_{HEX}")
    assert logins.reply_topic_permissions("fleet-conductor-1") is None
    for name in ("conductor", "compute.compute-1", f"reply_fleet-host-compute-1_{HEX}"):
        assert not any(matches(r, name) for r in (perm.configure, perm.write, perm.read)), name
    topic = logins.topic_permissions("fleet-operator")
    assert topic is not None
    assert matches(topic.write, "conductor") and not matches(topic.write, "compute.compute-1")
    assert not matches(topic.read, "conductor")


async def test_older_runtimes_get_their_queue_names_too() -> None:
    logins, _ = make()
    await logins.ensure(
        hosts=["compute-new"],
        old_runtime_hosts=["compute-old"],
        legacy={"fleet": ["compute-a", "compute-b"]},
        exchanges=["fleet"],
    )
    new = logins.permissions(logins.host_login("compute-new"))
    old = logins.permissions(logins.host_login("compute-old"))
    shared = logins.permissions("fleet")
    for name in ("compute", f"reply_{HEX}", f"compute_fanout_{HEX}"):
        assert matches(old.read, name) and matches(shared.read, name), name
        assert not matches(new.read, name), name
    for host in ("compute-a", "compute-b"):
        assert matches(shared.read, f"compute.{host}")
    assert not matches(shared.read, "compute.compute-new")
    shared_topic = logins.topic_permissions("fleet")
    assert shared_topic is not None and matches(shared_topic.read, "compute")
    assert logins.logins["fleet"] is Role.AGENT

    # The switches follow this tree's runtime: every agent gets the shared compute queue.
    transitional, _ = make(agent_topic_queue=True)
    await transitional.ensure(hosts=["compute-1"], exchanges=["fleet"])
    perm = transitional.permissions("fleet-host-compute-1")
    assert matches(perm.read, "compute") and not matches(perm.read, f"reply_{HEX}")


async def test_batches_send_only_what_changed() -> None:
    logins, ctl = make(tag="b1", exchange_pattern=r"fleet-test-[0-9a-f]{12}")
    await logins.ensure(conductors=["1", "2"], operators=[""], hosts=["compute-1", "compute-2"])
    assert len(ctl.imports) == 1
    first = ctl.imports[0]
    assert len(first["users"]) == len(first["permissions"]) == 5
    # No control exchange named yet: only the reply exchange's, for agents and operators.
    assert {t["exchange"] for t in first["topic_permissions"]} == {"fleet_reply"}
    assert len(first["topic_permissions"]) == 3
    for user in first["users"]:
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"])
        password = logins.password(user["name"]).encode()
        assert raw[4:] == hashlib.sha256(raw[:4] + password).digest()

    await logins.ensure(hosts=["compute-1"], conductors=["1"], operators=[""])
    assert len(ctl.imports) == 1  # nothing new: no broker call

    # An exchange the pattern covers: topic permissions only, for agents and operators.
    await logins.ensure(exchanges=[EXCHANGE])
    second = ctl.imports[1]
    assert "users" not in second and second["permissions"] == []
    assert {t["user"] for t in second["topic_permissions"]} == {
        "fleet-host-b1-compute-1",
        "fleet-host-b1-compute-2",
        "fleet-operator-b1",
    }
    assert {t["exchange"] for t in second["topic_permissions"]} == {EXCHANGE}

    # A new host: one user with its permissions and topic permissions.
    await logins.ensure(hosts=["compute-9"], exchanges=[EXCHANGE])
    third = ctl.imports[2]
    assert [u["name"] for u in third["users"]] == ["fleet-host-b1-compute-9"]
    assert len(third["permissions"]) == 1
    assert len(third["topic_permissions"]) == 2  # control and reply exchanges

    # An exchange the pattern does not cover: every non-conductor login's rights change.
    await logins.ensure(exchanges=["elsewhere"])
    fourth = ctl.imports[3]
    assert all("elsewhere" in p["configure"] for p in fourth["permissions"])
    assert len(fourth["permissions"]) == 4  # conductors already had everything

    # Same login, older code: its rights change, its password does not.
    before = logins.password("fleet-host-b1-compute-1")
    await logins.ensure(old_runtime_hosts=["compute-1"])
    # (and, a reply queue without a login existing now, every agent may answer it through
    # the default exchange)
    changed = {p["user"]: p for p in ctl.imports[4]["permissions"]}
    assert set(changed) == {f"fleet-host-b1-compute-{n}" for n in (1, 2, 9)}
    assert all("amq\\.default" in p["write"] for p in changed.values())
    assert logins.password("fleet-host-b1-compute-1") == before

    await logins.delete()
    assert sorted(ctl.deleted[0]) == sorted(
        u["name"] for i in ctl.imports for u in i.get("users", [])
    )
    await logins.delete()
    assert len(ctl.deleted) == 1  # nothing left to delete


async def test_definitions_describe_every_login_in_full() -> None:
    logins, ctl = make()
    await logins.ensure(conductors=["1"], hosts=["compute-1"], exchanges=["fleet"])
    full = logins.definitions()
    assert [u["name"] for u in full["users"]] == ["fleet-conductor-1", "fleet-host-compute-1"]
    assert full["permissions"] == ctl.imports[0]["permissions"]
    assert [(t["user"], t["exchange"]) for t in full["topic_permissions"]] == [
        ("fleet-host-compute-1", "fleet"),
        ("fleet-host-compute-1", "fleet_reply"),
    ]
    with pytest.raises(KeyError):
        logins.definitions(["fleet-host-compute-2"])


def test_delete_expression_is_one_erlang_call_and_refuses_unsafe_names() -> None:
    expr = _delete_users_expression(["fleet-host-a", "fleet-conductor-1"])
    assert expr.count("delete_user") == 1
    assert '<<"fleet-host-a">>' in expr and expr.endswith(".")
    with pytest.raises(ValueError):
        _delete_users_expression(['x">>, evil'])
