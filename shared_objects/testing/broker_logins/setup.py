"""``fleetctl broker setup``'s plan: the differences between the definitions ``BrokerLogins``
would send and what the broker's ``export_definitions`` holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from shared_objects.testing.broker_logins.limits import BrokerLimits
from shared_objects.testing.broker_logins.logins import BrokerLogins
from shared_objects.testing.broker_logins.rules import HASHING_ALGORITHM, password_matches


@dataclasses.dataclass
class SetupPlan:
    """What ``fleetctl broker setup`` finds to change: one line per action, and the definitions
    that make those changes in one ``import_definitions`` (empty when nothing changes)."""

    actions: list[str]
    definitions: dict[str, Any]
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.actions)


def _exchange_entry(vhost: str, spec: Any) -> dict[str, Any]:
    return {
        "name": spec.name,
        "vhost": vhost,
        "type": spec.type,
        "durable": spec.durable,
        "auto_delete": spec.auto_delete,
        "internal": False,
        "arguments": {},
    }


def plan_setup(
    logins: BrokerLogins,
    current: Mapping[str, Any],
    limits: BrokerLimits,
    exchanges: Sequence[Any] = (),
) -> SetupPlan:
    """Compare what ``logins`` (every login added to it), ``limits`` and ``exchanges``
    (``ExchangeSpec``s to create) want on the vhost with the broker's ``current`` definitions
    (``rabbitmqctl export_definitions``). Only what differs is planned; an existing password is
    kept when the password given for the login matches its hash."""
    vhost = logins.vhost
    actions: list[str] = []
    warnings: list[str] = []
    out: dict[str, list[dict[str, Any]]] = {
        "vhosts": [],
        "users": [],
        "permissions": [],
        "topic_permissions": [],
        "policies": [],
        "exchanges": [],
    }
    if not any(v.get("name") == vhost for v in current.get("vhosts", ())):
        actions.append(f"create vhost {vhost}")
        out["vhosts"].append({"name": vhost})
    users = {u.get("name"): u for u in current.get("users", ())}
    perms = {(p.get("user"), p.get("vhost")): p for p in current.get("permissions", ())}
    topics = {
        (t.get("user"), t.get("vhost"), t.get("exchange")): t
        for t in current.get("topic_permissions", ())
    }
    for login, grant in logins._grants.items():
        role = grant.role.value
        want_limits = logins.user_limits(login, limits)
        have = users.get(login)
        entry = logins._user_entry(login)
        entry["limits"] = want_limits
        if have is None:
            actions.append(f"create user {login} ({role})")
            out["users"].append(entry)
        else:
            why = []
            if not password_matches(logins.password(login), str(have.get("password_hash", ""))):
                why.append("password")
            else:
                entry["password_hash"] = have["password_hash"]
                entry["hashing_algorithm"] = have.get("hashing_algorithm", HASHING_ALGORITHM)
            if list(have.get("tags") or []) != []:
                why.append(f"tags {have.get('tags')} -> none")
            if dict(have.get("limits") or {}) != want_limits:
                why.append(f"limits {dict(have.get('limits') or {})} -> {want_limits}")
            if why:
                actions.append(f"update user {login} ({role}): {', '.join(why)}")
                out["users"].append(entry)
        perm = logins.permissions(login)
        got = perms.get((login, vhost))
        if got is None or (got.get("configure"), got.get("write"), got.get("read")) != (
            perm.configure,
            perm.write,
            perm.read,
        ):
            verb = "set" if got is None else "change"
            actions.append(f"{verb} permissions of {login} on {vhost}")
            out["permissions"].append(logins._perm_entry(login, perm))
        for exchange, topic in logins.topic_grants(login).items():
            got_t = topics.get((login, vhost, exchange))
            if got_t is None or (got_t.get("write"), got_t.get("read")) != (
                topic.write,
                topic.read,
            ):
                verb = "set" if got_t is None else "change"
                actions.append(f"{verb} topic permissions of {login} on {exchange}")
                out["topic_permissions"].append(logins._topic_entry(login, exchange, topic))
        for (user, v, exchange), _ in topics.items():
            if user == login and v == vhost and exchange not in logins.topic_grants(login):
                warnings.append(
                    f"{login} has topic permissions on {exchange} that Fleet does not grant "
                    f"(left as is; rabbitmqctl clear_topic_permissions -p {vhost} {login})"
                )
    policies = {(p.get("vhost"), p.get("name")): p for p in current.get("policies", ())}
    for policy in logins.policies(limits):
        got_p = policies.get((vhost, policy["name"]))
        keys = ("pattern", "apply-to", "priority", "definition")
        if got_p is None or any(got_p.get(k) != policy[k] for k in keys):
            verb = "create" if got_p is None else "change"
            actions.append(f"{verb} policy {policy['name']} ({policy['pattern']})")
            out["policies"].append(policy)
    found = {(e.get("vhost"), e.get("name")): e for e in current.get("exchanges", ())}
    for spec in exchanges:
        want = _exchange_entry(vhost, spec)
        got_e = found.get((vhost, spec.name))
        if got_e is None:
            actions.append(f"create exchange {spec.name} ({spec.type}, durable={spec.durable})")
            out["exchanges"].append(want)
        elif any(got_e.get(k) != want[k] for k in ("type", "durable", "auto_delete")):
            warnings.append(
                f"exchange {spec.name} exists with other flags "
                f"(type={got_e.get('type')}, durable={got_e.get('durable')}, "
                f"auto_delete={got_e.get('auto_delete')}); left as is"
            )
    definitions = {k: v for k, v in out.items() if v}
    return SetupPlan(actions, definitions, warnings)
