"""plan_setup: what ``fleetctl broker setup`` would change, against exported definitions."""

from __future__ import annotations

import copy
from typing import Any

from shared_objects.runtime.messaging.topology import REPLY_EXCHANGE, ExchangeSpec
from shared_objects.testing.broker_logins import (
    BrokerLimits,
    BrokerLogins,
    hash_password,
    password_matches,
    plan_setup,
)

EMPTY: dict[str, Any] = {"vhosts": [{"name": "/"}], "users": [], "permissions": []}
EXCHANGES = [ExchangeSpec("fleet", "topic"), REPLY_EXCHANGE]


def logins(**passwords: str) -> BrokerLogins:
    out = BrokerLogins(
        "rabbit://x:y@h:5672/fleet",
        legacy_queue_names=False,
        agent_topic_queue=False,
        passwords=passwords,
    )
    out.add(conductors=["1"], operators=[""], hosts=["compute-1"], exchanges=["fleet"])
    return out


def applied(current: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """``current`` after an import of ``definitions`` (replace by key, like RabbitMQ)."""
    out = copy.deepcopy(current)
    keys = {
        "vhosts": ("name",),
        "users": ("name",),
        "permissions": ("user", "vhost"),
        "topic_permissions": ("user", "vhost", "exchange"),
        "policies": ("vhost", "name"),
        "exchanges": ("vhost", "name"),
    }
    for section, entries in definitions.items():
        have = out.setdefault(section, [])
        for entry in entries:
            key = tuple(entry.get(k) for k in keys[section])
            have[:] = [e for e in have if tuple(e.get(k) for k in keys[section]) != key]
            have.append(entry)
    return out


def test_everything_is_planned_on_an_empty_broker_and_nothing_after() -> None:
    first = plan_setup(logins(), EMPTY, BrokerLimits(), EXCHANGES)
    assert first.actions[0] == "create vhost fleet"
    assert "create user fleet-host-compute-1 (agent)" in first.actions
    assert {p["name"] for p in first.definitions["policies"]} == {
        "fleet-rpc",
        "fleet-replies",
        "fleet-fanout",
        "fleet-notifications",
    }
    users = {u["name"]: u for u in first.definitions["users"]}
    assert users["fleet-host-compute-1"]["limits"] == {"max-connections": 8, "max-channels": 64}
    assert users["fleet-conductor-1"]["limits"] == {}
    rpc = next(p for p in first.definitions["policies"] if p["name"] == "fleet-rpc")
    assert rpc["definition"]["overflow"] == "reject-publish"
    notes = next(p for p in first.definitions["policies"] if p["name"] == "fleet-notifications")
    assert notes["definition"]["overflow"] == "drop-head"

    # What the broker then holds: nothing left to do for the same logins and passwords.
    mine = logins()
    current = applied(EMPTY, plan_setup(mine, EMPTY, BrokerLimits(), EXCHANGES).definitions)
    assert plan_setup(mine, current, BrokerLimits(), EXCHANGES).actions == []
    # Other passwords (a fresh BrokerLogins draws random ones): only the passwords change.
    changed = plan_setup(logins(), current, BrokerLimits(), EXCHANGES)
    assert changed.actions == [
        "update user fleet-conductor-1 (conductor): password",
        "update user fleet-operator (operator): password",
        "update user fleet-host-compute-1 (agent): password",
    ]
    # A password given for a login (a secrets file) is kept when the broker has it.
    given = logins(**{"fleet-operator": mine.password("fleet-operator")})
    kept = plan_setup(given, current, BrokerLimits(), EXCHANGES)
    assert "update user fleet-operator (operator): password" not in kept.actions


def test_only_differences_are_planned() -> None:
    mine = logins()
    current = applied(EMPTY, plan_setup(mine, EMPTY, BrokerLimits(), EXCHANGES).definitions)
    tighter = BrokerLimits(rpc_max_length=5, agent_max_channels=16)
    plan = plan_setup(mine, current, tighter, EXCHANGES)
    assert plan.actions == [
        "update user fleet-host-compute-1 (agent): limits "
        "{'max-connections': 8, 'max-channels': 64} -> {'max-connections': 8, 'max-channels': 16}",
        "change policy fleet-rpc (^(?:conductor|compute)(?:\\.|$))",
    ]
    # The unchanged password is kept as the broker has it (no new salt, no password change).
    (user,) = plan.definitions["users"]
    have = next(u for u in current["users"] if u["name"] == "fleet-host-compute-1")
    assert user["password_hash"] == have["password_hash"]
    # An exchange with other flags is reported, not changed.
    reply = plan_setup(mine, EMPTY, BrokerLimits(), EXCHANGES).definitions["exchanges"][1]
    odd = applied(current, {"exchanges": [{**reply, "durable": False}]})
    warned = plan_setup(mine, odd, BrokerLimits(), EXCHANGES)
    assert warned.actions == [] and "fleet_reply exists with other flags" in warned.warnings[0]


def test_password_matches_rabbitmq_hashes() -> None:
    stored = hash_password("s3cret/,@")
    assert password_matches("s3cret/,@", stored)
    assert not password_matches("other", stored)
    assert not password_matches("x", "not base64!")
