"""What each login may do, by role: permissions, topic permissions, queue policies and
connection limits (the table in ``shared_objects/testing/broker_logins/__init__.py``).
"""

from __future__ import annotations

from typing import Any

from shared_objects.runtime.config import SecurityConfig
from shared_objects.runtime.identity import Identities, Role
from shared_objects.testing.broker_logins.limits import BrokerLimits, _ms, _policy
from shared_objects.testing.broker_logins.rules import (
    _HEX32,
    _LOGIN_CHARS,
    AMQP_DEFAULT_EXCHANGE,
    COMPUTE_TOPIC,
    FULL,
    NOTIFICATION_PRIORITIES,
    REPLY_EXCHANGE_NAME,
    Permissions,
    TopicPermissions,
    _alt,
    _covers,
    _escape,
    _glob_regex,
    _Grant,
)


class LoginPermissions:
    """The permissions, topic permissions, policies and limits of each login, by role (the table
    in the package docstring); ``BrokerLogins`` holds the state they are computed from."""

    vhost: str
    security: SecurityConfig
    identities: Identities
    conductor_topic: str
    exchange_pattern: str | None
    notification_topics: tuple[str, ...]
    legacy_queue_names: bool
    agent_topic_queue: bool
    _grants: dict[str, _Grant]
    _exchanges: list[str]

    def exchanges_regex(self) -> str:
        """The control exchanges, as one unanchored alternation."""
        pattern = self.exchange_pattern
        parts = [_escape(e) for e in self._exchanges if not _covers(pattern, e)]
        if pattern:
            parts.insert(0, pattern)
        return "|".join(dict.fromkeys(parts)) or "(?!)"

    def _notification_queues(self) -> str:
        topics = "|".join(_escape(t) for t in self.notification_topics)
        return f"(?:{topics})\\.(?:{'|'.join(NOTIFICATION_PRIORITIES)})" if topics else ""

    def _amq_default_for_agents(self) -> bool:
        """Agents keep write on ``amq.default`` only while some caller still has a reply queue
        without a login (``reply_<hex>``: a release before 1.2), which only the default exchange
        reaches: during a rolling upgrade, never in a deployment on this release alone."""
        return self.legacy_queue_names or any(g.old_runtime for g in self._grants.values())

    def permissions(self, login: str) -> Permissions:
        """The vhost permissions of ``login`` (see the module docstring)."""
        grant = self._grants[login]
        if grant.role is Role.CONDUCTOR:
            return FULL
        e = self.exchanges_regex()
        r = _escape(REPLY_EXCHANGE_NAME)
        esc = _escape(login)
        old = grant.old_runtime or self.legacy_queue_names
        if grant.role is Role.OPERATOR:
            replies = [f"reply_{esc}_{_HEX32}", *([f"reply_{_HEX32}"] if old else [])]
            return Permissions(
                configure=_alt([e, r, *replies]),
                write=_alt([e, *replies]),
                read=_alt([r, *replies]),
            )
        own = [f"reply_{esc}_{_HEX32}"]
        for host in sorted(grant.hosts):
            h = _escape(host)
            own += [f"{COMPUTE_TOPIC}\\.{h}", f"{COMPUTE_TOPIC}_fanout_{h}_{_HEX32}"]
        if old:
            own += [f"reply_{_HEX32}", f"{COMPUTE_TOPIC}_fanout_{_HEX32}"]
        if old or self.agent_topic_queue:
            own.append(COMPUTE_TOPIC)
        fanout = f"{COMPUTE_TOPIC}_fanout"
        notes = self._notification_queues()
        default = [_escape(AMQP_DEFAULT_EXCHANGE)] if old or self._amq_default_for_agents() else []
        return Permissions(
            configure=_alt([e, r, fanout, *own, notes]),
            write=_alt([e, r, *default, *own, notes]),
            read=_alt([e, r, fanout, *own]),
        )

    def topic_permissions(self, login: str) -> TopicPermissions | None:
        """Routing-key permissions of ``login`` on each control exchange (None: unrestricted)."""
        grant = self._grants[login]
        topic = _escape(self.conductor_topic)
        if grant.role is Role.CONDUCTOR:
            return None
        if grant.role is Role.OPERATOR:
            return TopicPermissions(write=_alt([topic]), read="^$")
        notes = self._notification_queues()
        binds = [f"{COMPUTE_TOPIC}\\.{_escape(h)}" for h in sorted(grant.hosts)]
        if grant.old_runtime or self.legacy_queue_names or self.agent_topic_queue:
            binds.append(COMPUTE_TOPIC)
        return TopicPermissions(
            write=_alt([topic, f"{COMPUTE_TOPIC}\\..+", notes]), read=_alt([*binds, notes])
        )

    def reply_callers_regex(self) -> str:
        """The logins an agent may answer, unanchored: conductors and agents (live-migration
        peers call each other; ``reply_checks`` on the caller's side refuses a reply from
        anyone but the agent it called). Never an operator: operators call only conductors."""
        parts = [_glob_regex(g) for g in self.security.conductor_logins]
        parts.append(f"{_escape(self.security.host_login_prefix)}{_LOGIN_CHARS}+")
        if self.security.legacy_shared_login:
            parts.append(_escape(self.security.legacy_shared_login))
        prefix = self.security.host_login_prefix
        parts += [
            _escape(g.login)
            for g in self._grants.values()
            if g.role is Role.AGENT and not g.login.startswith(prefix)
        ]
        parts = [p for p in dict.fromkeys(parts) if p]
        return f"(?:{'|'.join(parts)})"

    def reply_topic_permissions(self, login: str) -> TopicPermissions | None:
        """Routing-key permissions of ``login`` on the reply exchange (None: unrestricted).

        Read (what it may bind a queue to): its own ``reply_<login>_<hex>`` only, so no login
        can have another's replies delivered to a queue of its own. Write (which reply queues
        it may answer): an agent, the reply queues of conductors and agents; an operator
        serves nobody, nothing.
        """
        grant = self._grants[login]
        if grant.role is Role.CONDUCTOR:
            return None
        read = _alt([f"reply_{_escape(login)}_{_HEX32}"])
        if grant.role is Role.OPERATOR:
            return TopicPermissions(write="^$", read=read)
        return TopicPermissions(
            write=_alt([f"reply_{self.reply_callers_regex()}_{_HEX32}"]), read=read
        )

    def topic_grants(self, login: str) -> dict[str, TopicPermissions]:
        """Every topic permission of ``login``: exchange -> routing-key regexes."""
        out: dict[str, TopicPermissions] = {}
        topic = self.topic_permissions(login)
        if topic is not None:
            for exchange in self._exchanges:
                out[exchange] = topic
        reply = self.reply_topic_permissions(login)
        if reply is not None:
            out[REPLY_EXCHANGE_NAME] = reply
        return out

    # --- a whole deployment (fleetctl broker setup, plan_setup) ------------------------------

    def policies(self, limits: BrokerLimits) -> list[dict[str, Any]]:
        """One policy per kind of Fleet queue (a queue gets only its highest-priority policy,
        so each carries its whole definition). Patterns are anchored, over queue names."""
        vhost = self.vhost
        topics = "|".join(_escape(t) for t in dict.fromkeys([self.conductor_topic, COMPUTE_TOPIC]))
        notes = "|".join(_escape(t) for t in self.notification_topics)
        out = [
            _policy(
                vhost,
                "fleet-rpc",
                f"^(?:{topics})(?:\\.|$)",
                10,
                {
                    "max-length": limits.rpc_max_length,
                    "max-length-bytes": limits.rpc_max_bytes,
                    "overflow": "reject-publish",
                },
            ),
            _policy(
                vhost,
                "fleet-replies",
                "^reply_",
                20,
                {
                    "max-length": limits.reply_max_length,
                    "overflow": "reject-publish",
                    "message-ttl": _ms(limits.reply_ttl),
                },
            ),
            _policy(
                vhost,
                "fleet-fanout",
                "^[A-Za-z0-9.-]+_fanout_",
                20,
                {
                    "max-length": limits.fanout_max_length,
                    "overflow": "reject-publish",
                    "message-ttl": _ms(limits.fanout_ttl),
                },
            ),
        ]
        if notes:
            out.append(
                _policy(
                    vhost,
                    "fleet-notifications",
                    f"^(?:{notes})\\.",
                    20,
                    {
                        "max-length": limits.notifications_max_length,
                        "overflow": "drop-head",
                        "message-ttl": _ms(limits.notifications_ttl),
                    },
                )
            )
        return out

    def user_limits(self, login: str, limits: BrokerLimits) -> dict[str, int]:
        role = self._grants[login].role
        if role is Role.AGENT:
            pair = (limits.agent_max_connections, limits.agent_max_channels)
        elif role is Role.OPERATOR:
            pair = (limits.operator_max_connections, limits.operator_max_channels)
        else:
            return {}
        return {k: v for k, v in zip(("max-connections", "max-channels"), pair, strict=True) if v}
