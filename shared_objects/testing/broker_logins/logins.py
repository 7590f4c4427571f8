"""``BrokerLogins``: creates (in batches), hands out and deletes the broker logins of one vhost."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog

from shared_objects.runtime.config import SecurityConfig
from shared_objects.runtime.identity import Identities, Role
from shared_objects.testing.broker_logins.ctl import Ctl, NodeCtl, Rabbitmqctl
from shared_objects.testing.broker_logins.permissions import LoginPermissions
from shared_objects.testing.broker_logins.rules import (
    _LOGIN_RE,
    HASHING_ALGORITHM,
    NOTIFICATION_TOPICS,
    Permissions,
    TopicPermissions,
    _Grant,
    agents_consume_topic_queue,
    hash_password,
    runtime_names_queues_by_login,
)

if TYPE_CHECKING:
    from shared_objects.testing.rabbit_cluster import RabbitCluster
    from shared_objects.testing.rabbit_node import RabbitNode


log = structlog.get_logger(__name__)


class BrokerLogins(LoginPermissions):
    """Creates (in batches), hands out and deletes the broker logins of one cluster's vhost.

    ``admin_url`` gives the hosts, port, vhost and query of every URL :meth:`url_for` builds; its
    own credentials are never used (administration goes through ``ctl``). ``vhost`` defaults to
    the URL's. ``exchange_pattern`` (a regex, unanchored pieces) names control exchanges not known
    yet, e.g. ``fleet-test-[0-9a-f]{12}`` for the tests' per-test exchanges; names passed to
    :meth:`ensure` are always covered (and get topic permissions). ``legacy_queue_names``: also
    grant the pre-issue-11 queue names to every agent and operator login (None: when this tree's
    runtime still uses them); ``agent_topic_queue``: agents may consume the shared ``compute``
    queue (None: when this tree's agent still does). ``passwords`` fixes some logins' passwords
    (a deployment file's); the others get random ones (``secrets``).

    Not bound to an event loop: it may be used from several ``asyncio.run`` calls in turn.
    """

    def __init__(
        self,
        admin_url: str,
        vhost: str | None = None,
        *,
        ctl: Ctl | None = None,
        tag: str = "",
        security: SecurityConfig | None = None,
        conductor_topic: str = "conductor",
        exchange_pattern: str | None = None,
        notification_topics: Sequence[str] = NOTIFICATION_TOPICS,
        legacy_queue_names: bool | None = None,
        agent_topic_queue: bool | None = None,
        passwords: Mapping[str, str] | None = None,
    ) -> None:
        from shared_objects.runtime.messaging.urls import parse_transport_url

        parsed = parse_transport_url(admin_url)
        if parsed.scheme not in ("amqp", "amqps"):
            raise ValueError(f"BrokerLogins needs a RabbitMQ URL, got {admin_url.split(':')[0]}")
        if tag and not re.fullmatch(r"[a-z0-9]{1,16}", tag):
            raise ValueError(f"tag must be 1-16 lower-case letters or digits, got {tag!r}")
        self.admin_url = admin_url
        self.vhost = vhost if vhost is not None else parsed.virtual_host
        self.ctl: Ctl = ctl if ctl is not None else Rabbitmqctl()
        self.tag = tag
        if security is None:
            security = SecurityConfig()
            if tag:
                security.host_login_prefix = f"{security.host_login_prefix}{tag}-"
        self.security = security
        self.identities = Identities(security)
        self.conductor_topic = conductor_topic
        self.exchange_pattern = exchange_pattern
        self.notification_topics = tuple(notification_topics)
        if legacy_queue_names is None:
            legacy_queue_names = not runtime_names_queues_by_login()
        self.legacy_queue_names = legacy_queue_names
        if agent_topic_queue is None:
            agent_topic_queue = legacy_queue_names or agents_consume_topic_queue()
        self.agent_topic_queue = agent_topic_queue
        # Fixed passwords (a compose file's local-only ones); every other login gets a random one.
        self._passwords: dict[str, str] = dict(passwords or {})
        self._grants: dict[str, _Grant] = {}
        self._exchanges: list[str] = []
        # What the broker holds (as far as this object knows), to send only changes.
        self._users_done: set[str] = set()
        self._perms_done: dict[str, Permissions] = {}
        self._topics_done: dict[tuple[str, str], TopicPermissions] = {}
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.last_batch_seconds: float | None = None

    @classmethod
    def for_node(
        cls, node: RabbitNode | RabbitCluster, vhost: str = "/", **kwargs: Any
    ) -> BrokerLogins:
        """Logins on a private RabbitNode (its own rabbitmqctl, node name and cookie) or
        RabbitCluster (users are cluster-wide; URLs list every node)."""
        return cls(node.url, vhost, ctl=NodeCtl(node), **kwargs)

    # --- names ------------------------------------------------------------------------------

    def _name(self, base: str, name: str) -> str:
        return "-".join(part for part in (base, self.tag, name) if part)

    def host_login(self, host: str) -> str:
        """The login of ``host``'s agent (``fleet-host-[<tag>-]<host>``)."""
        return self._check(self.identities.login_for_host(host), Role.AGENT)

    def conductor_login(self, name: str = "") -> str:
        """``fleet-conductor[-<tag>][-<name>]``, a conductor under the ``[security]`` patterns."""
        return self._check(self._name("fleet-conductor", name), Role.CONDUCTOR)

    def operator_login(self, name: str = "") -> str:
        """``fleet-operator[-<tag>][-<name>]``, an operator under the ``[security]`` patterns."""
        return self._check(self._name("fleet-operator", name), Role.OPERATOR)

    def _check(self, login: str, role: Role) -> str:
        if not _LOGIN_RE.match(login):
            raise ValueError(f"unsafe broker login {login!r}")
        got = self.identities.resolve(login).role
        if got is not role:
            raise ValueError(f"login {login!r} would be {got.value}, not {role.value}")
        return login

    def security_env(self) -> dict[str, str]:
        """``FLEET_SECURITY__*`` for the processes, so they resolve these logins as named here.

        Only what differs from the defaults (nothing for an untagged, default configuration).
        Processes of releases without a ``[security]`` section must not get it.
        """
        env: dict[str, str] = {}
        default = SecurityConfig()
        for field in dataclasses.fields(SecurityConfig):
            value = getattr(self.security, field.name)
            if value != getattr(default, field.name):
                text = ",".join(value) if isinstance(value, tuple) else str(value)
                env[f"FLEET_SECURITY__{field.name.upper()}"] = text
        return env

    @property
    def logins(self) -> dict[str, Role]:
        """Every login this object has provisioned (or been asked for), with its role."""
        return {login: grant.role for login, grant in self._grants.items()}

    def password(self, login: str) -> str:
        try:
            return self._passwords[login]
        except KeyError:
            raise KeyError(f"no login {login!r} was ensured by this BrokerLogins") from None

    def url_for(self, login: str) -> str:
        """``admin_url`` with ``login`` and its password on every host (same vhost and query)."""
        password = self.password(login)
        scheme, _, rest = self.admin_url.partition("://")
        rest, qmark, query = rest.partition("?")
        netloc = rest.partition("/")[0]
        hosts = [h.rpartition("@")[2] for h in netloc.split(",") if h] or ["localhost"]
        creds = f"{quote(login, safe='')}:{quote(password, safe='')}"
        path = "" if self.vhost == "/" else quote(self.vhost, safe="")
        url = f"{scheme}://{','.join(f'{creds}@{h}' for h in hosts)}/{path}"
        return f"{url}?{query}" if qmark else url

    # --- provisioning -----------------------------------------------------------------------

    def _grant(self, grant: _Grant) -> None:
        known = self._grants.get(grant.login)
        if known is not None and known.role is not grant.role:
            raise ValueError(f"login {grant.login!r} is already a {known.role.value}")
        self._grants[grant.login] = grant  # replaces: a host's runtime, a shared login's hosts
        self._passwords.setdefault(grant.login, secrets.token_urlsafe(24))

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def add(
        self,
        *,
        conductors: Iterable[str] = (),
        operators: Iterable[str] = (),
        hosts: Iterable[str] = (),
        old_runtime_hosts: Iterable[str] = (),
        legacy: Mapping[str, Iterable[str]] | None = None,
        exchanges: Iterable[str] = (),
    ) -> list[str]:
        """Record logins and control exchanges without touching the broker (:meth:`ensure` sends
        them; :meth:`definitions` writes them to a file). Arguments as for :meth:`ensure`."""
        requested: list[str] = []
        old_hosts = set(old_runtime_hosts)
        for exchange in exchanges:
            if exchange not in self._exchanges:
                self._exchanges.append(exchange)
        for name in conductors:
            login = self.conductor_login(name)
            self._grant(_Grant(login, Role.CONDUCTOR))
            requested.append(login)
        for name in operators:
            login = self.operator_login(name)
            self._grant(_Grant(login, Role.OPERATOR))
            requested.append(login)
        for host in [*hosts, *sorted(old_hosts)]:
            login = self.host_login(host)
            self._grant(_Grant(login, Role.AGENT, frozenset({host}), host in old_hosts))
            requested.append(login)
        for login, served in (legacy or {}).items():
            if not _LOGIN_RE.match(login):
                raise ValueError(f"unsafe broker login {login!r}")
            role = self.identities.resolve(login).role
            if role in (Role.CONDUCTOR, Role.OPERATOR):
                raise ValueError(f"shared agent login {login!r} is a {role.value} login")
            self._grant(_Grant(login, Role.AGENT, frozenset(served), old_runtime=True))
            requested.append(login)
        return requested

    async def ensure(
        self,
        *,
        conductors: Iterable[str] = (),
        operators: Iterable[str] = (),
        hosts: Iterable[str] = (),
        old_runtime_hosts: Iterable[str] = (),
        legacy: Mapping[str, Iterable[str]] | None = None,
        exchanges: Iterable[str] = (),
    ) -> list[str]:
        """Make sure these logins exist with their permissions; one broker call at most.

        ``conductors`` / ``operators`` are names (``"1"`` -> ``fleet-conductor[-<tag>]-1``, ``""``
        -> ``fleet-operator[-<tag>]``); ``hosts`` are agent host names, their agents on this
        release; ``old_runtime_hosts`` the hosts whose agents (own logins) run an older release;
        ``legacy`` maps a shared login to ALL the hosts whose older agents use it now (what it
        served before and is not listed loses its rights); ``exchanges`` are
        control exchanges (permissions and topic permissions for every login). Returns the
        logins named by this call. What the broker already holds is not sent again.
        """
        async with self._get_lock():
            requested = self.add(
                conductors=conductors,
                operators=operators,
                hosts=hosts,
                old_runtime_hosts=old_runtime_hosts,
                legacy=legacy,
                exchanges=exchanges,
            )
            await self._apply()
        return requested

    async def ensure_host(self, host: str, *, old_runtime: bool = False) -> str:
        if old_runtime:
            return (await self.ensure(old_runtime_hosts=[host]))[0]
        return (await self.ensure(hosts=[host]))[0]

    async def ensure_conductor(self, name: str = "") -> str:
        return (await self.ensure(conductors=[name]))[0]

    async def ensure_operator(self, name: str = "") -> str:
        return (await self.ensure(operators=[name]))[0]

    def definitions(self, logins: Iterable[str] | None = None) -> dict[str, Any]:
        """The full definitions (users, permissions, topic permissions) of ``logins`` (default:
        all), as ``rabbitmqctl import_definitions`` or RabbitMQ's ``load_definitions`` read them.
        """
        users, perms, topics = [], [], []
        for login in logins if logins is not None else list(self._grants):
            users.append(self._user_entry(login))
            perms.append(self._perm_entry(login, self.permissions(login)))
            for exchange, topic in self.topic_grants(login).items():
                topics.append(self._topic_entry(login, exchange, topic))
        return {"users": users, "permissions": perms, "topic_permissions": topics}

    def _user_entry(self, login: str) -> dict[str, Any]:
        return {
            "name": login,
            "password_hash": hash_password(self._passwords[login]),
            "hashing_algorithm": HASHING_ALGORITHM,
            "tags": [],
        }

    def _perm_entry(self, login: str, perm: Permissions) -> dict[str, Any]:
        return {"user": login, "vhost": self.vhost, **dataclasses.asdict(perm)}

    def _topic_entry(self, login: str, exchange: str, topic: TopicPermissions) -> dict[str, Any]:
        return {
            "user": login,
            "vhost": self.vhost,
            "exchange": exchange,
            **dataclasses.asdict(topic),
        }

    async def _apply(self) -> None:
        users, perms, topics = [], [], []
        want_perms: dict[str, Permissions] = {}
        want_topics: dict[tuple[str, str], TopicPermissions] = {}
        for login in self._grants:
            if login not in self._users_done:
                users.append(self._user_entry(login))
            perm = self.permissions(login)
            if self._perms_done.get(login) != perm:
                perms.append(self._perm_entry(login, perm))
                want_perms[login] = perm
            for exchange, topic in self.topic_grants(login).items():
                if self._topics_done.get((login, exchange)) != topic:
                    topics.append(self._topic_entry(login, exchange, topic))
                    want_topics[(login, exchange)] = topic
        if not (users or perms or topics):
            return
        definitions: dict[str, Any] = {"permissions": perms, "topic_permissions": topics}
        if users:
            definitions["users"] = users
        started = time.monotonic()
        await self.ctl.import_definitions(definitions)
        self.last_batch_seconds = time.monotonic() - started
        self.batches += 1
        self._users_done.update(u["name"] for u in users)
        self._perms_done.update(want_perms)
        self._topics_done.update(want_topics)
        log.info(
            "broker_logins_imported",
            vhost=self.vhost,
            users=len(users),
            permissions=len(perms),
            topic_permissions=len(topics),
            seconds=round(self.last_batch_seconds, 3),
        )

    async def delete(self) -> None:
        """Delete every user this object created (their permissions go with them)."""
        async with self._get_lock():
            created = sorted(self._users_done)
            if created:
                await self.ctl.delete_users(created)
            self._users_done.clear()
            self._perms_done.clear()
            self._topics_done.clear()
            self._grants.clear()
            self._passwords.clear()

    async def __aenter__(self) -> BrokerLogins:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()
