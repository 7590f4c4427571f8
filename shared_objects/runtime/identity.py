"""Who is calling: broker logins, the roles they map to, and the hosts an agent login speaks for.

Fleet trusts nothing in a message body about its sender. RabbitMQ checks the AMQP ``user_id``
property of every message against the login of the connection that published it, so the
``user_id`` a receiver sees is the sender's real login. This module turns that login into a
:class:`Caller` using the ``[security]`` configuration (``SecurityConfig``):

* ``conductor_logins`` / ``operator_logins``: glob patterns (``fleet-conductor-*``);
* ``<host_login_prefix><host>``: the agent of ``<host>`` (``fleet-host-compute-1``), the naming
  rule every deployment follows (``docs/security.md``);
* ``legacy_shared_login`` with ``legacy_hosts``: during a rolling upgrade from a release whose
  hosts shared one login, that login speaks for the listed hosts (all of them at once: a shared
  login cannot tell them apart), and for nothing else.

A login that matches nothing is ``Role.UNKNOWN`` and may call nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools

from shared_objects.runtime.config import SecurityConfig


class Role(enum.StrEnum):
    CONDUCTOR = "conductor"
    OPERATOR = "operator"
    AGENT = "agent"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """A resolved caller. ``hosts`` is what an agent login speaks for (empty otherwise)."""

    login: str
    role: Role
    hosts: frozenset[str] = frozenset()
    # True for the shared login of a release that predates per-host logins.
    legacy: bool = False

    @property
    def is_agent(self) -> bool:
        return self.role is Role.AGENT

    @property
    def is_privileged(self) -> bool:
        """Conductors and operators: not limited to one host's belongings."""
        return self.role in (Role.CONDUCTOR, Role.OPERATOR)

    def speaks_for(self, host: str | None) -> bool:
        return host is not None and host in self.hosts

    def __str__(self) -> str:
        return f"{self.role.value}:{self.login or '<none>'}"


UNAUTHENTICATED = Caller("", Role.UNKNOWN)


class Identities:
    """Login <-> role/host resolution for one configuration (cached: it runs on every call)."""

    def __init__(self, config: SecurityConfig | None = None) -> None:
        self.config = config if config is not None else SecurityConfig()
        self._legacy_login = self.config.legacy_shared_login
        legacy = self.config.legacy_hosts if self._legacy_login else ()
        self._legacy_hosts = frozenset(legacy)
        self.resolve = functools.lru_cache(maxsize=4096)(self._resolve)

    def login_for_host(self, host: str) -> str:
        """The login the agent of ``host`` uses (the documented naming rule)."""
        return f"{self.config.host_login_prefix}{host}"

    def host_logins(self, host: str) -> frozenset[str]:
        """Every login that may speak for ``host`` (its own; the legacy one while listed)."""
        own = self.login_for_host(host)
        if host in self._legacy_hosts:
            return frozenset({own, self._legacy_login})
        return frozenset({own})

    def is_conductor(self, login: str | None) -> bool:
        return self.resolve(login).role is Role.CONDUCTOR

    def _resolve(self, login: str | None) -> Caller:
        if not login:
            return UNAUTHENTICATED
        cfg = self.config
        if login == self._legacy_login:
            return Caller(login, Role.AGENT, self._legacy_hosts, legacy=True)
        if any(fnmatch.fnmatchcase(login, p) for p in cfg.conductor_logins):
            return Caller(login, Role.CONDUCTOR)
        if any(fnmatch.fnmatchcase(login, p) for p in cfg.operator_logins):
            return Caller(login, Role.OPERATOR)
        prefix = cfg.host_login_prefix
        if login.startswith(prefix) and len(login) > len(prefix):
            return Caller(login, Role.AGENT, frozenset({login[len(prefix) :]}))
        return Caller(login, Role.UNKNOWN)

    def describe(self) -> dict[str, object]:
        """For the start-up log line: the rules in force, the legacy exception loudly."""
        return {
            "conductor_logins": list(self.config.conductor_logins),
            "operator_logins": list(self.config.operator_logins),
            "host_login_prefix": self.config.host_login_prefix,
            "legacy_shared_login": self._legacy_login or None,
            "legacy_hosts": sorted(self._legacy_hosts),
        }
