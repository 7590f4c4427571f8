"""RabbitMQ logins for a Fleet cluster: one per agent host, conductor logins, operator logins.

Fleet decides what a caller may do from the AMQP ``user_id`` RabbitMQ validated against the
connection's login (``shared_objects/identity.py``), so every process logs in as its own broker
user. This is the one place the test kit, ``make demo`` and the local clusters create them::

    logins = BrokerLogins("rabbit://guest:guest@127.0.0.1:5672/fleet-test-x", tag="a1b2c3")
    await logins.ensure(
        conductors=["1", "2"], operators=[""], hosts=["compute-1"], exchanges=["fleet"]
    )
    url = logins.url_for(logins.host_login("compute-1"))   # FLEET_TRANSPORT_URL of that agent
    ...
    await logins.delete()                                   # every user this object created

Fast, in batches: everything one ``ensure`` call needs (users with a ``password_hash`` computed
here, their permissions and topic permissions) goes to the broker in ONE
``rabbitmqctl import_definitions`` run, and only what changed since the last call; ``delete``
removes every user in one ``rabbitmqctl eval`` (one ``delete_user`` per user if that fails).
A batch costs one rabbitmqctl start-up, about 0.7-1 s on the development machine whatever its
size (50 users: 0.8 s), where one ``add_user`` + ``set_permissions`` + ``set_topic_permissions``
per login costs 2-3 s per login. ``last_batch_seconds`` and ``batches`` record what it took.

Users are global to a broker, vhosts are not: two test sessions on one broker would fight over
``fleet-host-compute-1``'s password and delete each other's users. A ``tag`` makes every login
this object names unique (``fleet-host-<tag>-compute-1``, ``fleet-conductor-<tag>-1``,
``fleet-operator-<tag>``); the conductor and operator names still match the default
``[security]`` patterns, and :meth:`BrokerLogins.security_env` gives the
``FLEET_SECURITY__HOST_LOGIN_PREFIX`` the processes need to read the agent logins back. Without a
tag (``make demo``) the logins are the documented ones, ``fleet-host-<host>``.

Permissions (regular ones on the vhost, topic ones on each control exchange and on the reply
exchange ``R`` = ``fleet_reply``), by role. ``E`` is the control exchange(s) —
``exchange_pattern`` and the names given to ``ensure(exchanges=...)`` —, ``T`` the conductor
topic, ``N`` the notification queues ``<topic>.<priority>`` of ``notification_topics`` (the
agents' notifier declares and binds them), ``L`` the login, ``X`` the agent's host, ``C`` the
logins an agent answers (conductors by the ``[security]`` globs, agents by the host prefix, a
legacy shared login); every regex is anchored (RabbitMQ's are not by default):

=========  ===============================================  ====================================
role       configure / write / read                          topic permissions on ``E`` / ``R``
=========  ===============================================  ====================================
conductor  ``.*`` / ``.*`` / ``.*``                           none (every routing key)
agent      c: ``^(E|R|compute_fanout|Q|N)$``                  E write ``^(T|compute\\..+|N)$``
           w: ``^(E|R|Q|N)$``                                 E read ``^(compute\\.X|N)$``
           r: ``^(E|R|compute_fanout|Q)$``                    R write ``^reply_C_[0-9a-f]{32}$``
           where Q = ``compute\\.X|reply_L_[0-9a-f]{32}|``   R read ``^reply_L_[0-9a-f]{32}$``
           ``compute_fanout_X_[0-9a-f]{32}``
operator   c: ``^(E|R|reply_L_[0-9a-f]{32})$``                 E write ``^T$``, read ``^$``
           w: ``^(E|reply_L_[0-9a-f]{32})$``                   R write ``^$``
           r: ``^(R|reply_L_[0-9a-f]{32})$``                   R read ``^reply_L_[0-9a-f]{32}$``
=========  ===============================================  ====================================

Why each right: an RPC client declares ``E`` before publishing (configure) and publishes to it
(write); a server declares and binds its queues (configure and write on the queue, read on the
exchange, topic read on the binding key) and consumes them (read); a caller declares ``R`` and
binds its reply queue there under the queue's own name (topic read: its own name only); a
server publishes its replies on ``R`` (write; topic write: the reply queues of the logins that
may call it); a server's fanout queue is deleted at stop (configure). An agent may therefore
consume only its own ``compute.X``, fanout and reply queues, bind only ``compute.X``, its reply
queue (and the notification queues), and publish on ``E`` only to the conductor, to another
agent's ``compute.<host>`` and notifications, on ``R`` only to conductors' and agents' reply
queues; it cannot consume ``conductor`` nor another login's replies, nor publish through the
default exchange (``amq.default``, which reaches ANY queue by name and has no per-routing-key
check): agents get write on it only while a login of an older release (``old_runtime_hosts``,
``legacy``, ``legacy_queue_names``) is present, whose ``reply_<32 hex>`` queues only the
default exchange reaches. Topic permissions exist per exchange name only, so an exchange known
only by ``exchange_pattern`` has none (every routing key) until it is passed to ``ensure``.

``fleetctl broker setup`` builds on this class: :meth:`BrokerLogins.policies`,
:meth:`BrokerLogins.user_limits` and :func:`plan_setup` (the differences between these
definitions and the broker's ``export_definitions``).

Agents on a release before issue 11 (``old_runtime_hosts``, shared ``legacy`` logins) name their
queues differently: the bare ``compute`` queue (bound with key ``compute``), ``reply_<32 hex>``
and ``compute_fanout_<32 hex>``; they get those names too. Two switches follow the code of this
tree while issue 11 lands, each asked of the code itself when left at None:
``legacy_queue_names`` (the RPC runtime still names reply queues ``reply_<32 hex>``: every agent
and operator login gets the old names) and ``agent_topic_queue`` (this tree's agent still
consumes the shared ``compute`` queue: agents may declare, bind and consume it).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import structlog

from shared_objects.config import MessagingConfig, SecurityConfig
from shared_objects.identity import Identities, Role
from shared_objects.messaging.topology import REPLY_EXCHANGE

if TYPE_CHECKING:
    from shared_objects.testing.rabbit_cluster import RabbitCluster
    from shared_objects.testing.rabbit_node import RabbitNode

__all__ = [
    "AMQP_DEFAULT_EXCHANGE",
    "REPLY_EXCHANGE_NAME",
    "BrokerLimits",
    "BrokerLogins",
    "Ctl",
    "CtlError",
    "NodeCtl",
    "Permissions",
    "Rabbitmqctl",
    "SetupCtl",
    "SetupPlan",
    "TopicPermissions",
    "agents_consume_topic_queue",
    "hash_password",
    "password_matches",
    "plan_setup",
    "runtime_names_queues_by_login",
]

log = structlog.get_logger(__name__)

# The name RabbitMQ checks permissions on when a message goes to the default exchange ("").
AMQP_DEFAULT_EXCHANGE = "amq.default"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
COMPUTE_TOPIC = "compute"
NOTIFICATION_TOPICS = ("versioned_notifications",)
NOTIFICATION_PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")
_HEX32 = "[0-9a-f]{32}"
#: The exchange Fleet replies travel through (``shared_objects.messaging.topology``).
REPLY_EXCHANGE_NAME = REPLY_EXCHANGE.name
# The characters of a login (no ``_``: it separates the login in ``reply_<login>_<hex>``).
_LOGIN_CHARS = "[A-Za-z0-9.@+-]"
# Logins go into URLs, JSON and an Erlang expression: keep them to a safe alphabet.
_LOGIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,254}$")


class CtlError(RuntimeError):
    """rabbitmqctl failed (not installed, no access to the node, or the command failed)."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt4 + sha256(salt4 + password))."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


@dataclasses.dataclass(frozen=True, slots=True)
class Permissions:
    """``set_permissions`` of one user on one vhost (RabbitMQ regexes)."""

    configure: str
    write: str
    read: str


@dataclasses.dataclass(frozen=True, slots=True)
class TopicPermissions:
    """``set_topic_permissions`` of one user on one topic exchange (routing-key regexes)."""

    write: str
    read: str


FULL = Permissions(".*", ".*", ".*")


def _escape(name: str) -> str:
    """``name`` as a literal in a RabbitMQ (PCRE) regex; ``-`` stays readable."""
    return re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", name)


def _alt(parts: Iterable[str]) -> str:
    """``^(?:a|b|c)$`` over the (already escaped) ``parts``; ``^$`` matches nothing useful."""
    unique = list(dict.fromkeys(p for p in parts if p))
    return f"^(?:{'|'.join(unique)})$" if unique else "^$"


def _glob_regex(pattern: str) -> str:
    """A ``[security]`` login glob (``fleet-conductor-*``) as an unanchored RabbitMQ regex over
    login characters (``*``: any run of them, ``?``: one; everything else literal)."""
    out = []
    for char in pattern:
        if char == "*":
            out.append(f"{_LOGIN_CHARS}*")
        elif char == "?":
            out.append(_LOGIN_CHARS)
        else:
            out.append(_escape(char))
    return "".join(out)


def _covers(pattern: str | None, name: str) -> bool:
    """Whether ``pattern`` surely matches ``name`` (checked with Python's re: simple patterns)."""
    if not pattern:
        return False
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def runtime_names_queues_by_login() -> bool:
    """True when this tree's RPC runtime names reply queues ``reply_<login>_<hex>`` (issue 11).

    Asked of the runtime itself (a throwaway in-memory transport), so the permissions follow the
    code that will run under them.
    """
    from shared_objects.messaging import get_transport
    from shared_objects.messaging.memory import MemoryBroker

    probe = "fleet-probe-login"
    cfg = MessagingConfig(transport_url=f"memory://{probe}@probe-{uuid.uuid4().hex}")
    transport = get_transport(cfg, memory_broker=MemoryBroker())
    return transport.replies.queue_name.startswith(f"reply_{probe}_")


def agents_consume_topic_queue() -> bool:
    """True while this tree's compute agent consumes the shared ``compute`` queue (issue 11
    stops it): asked of a real ``ComputeAgentService`` built (not started) on a throwaway
    in-memory transport."""
    from compute_agent.service import ComputeAgentService
    from compute_agent.virt.fake import FakeDriver
    from compute_agent.virt.fake_config import FakeDriverConfig
    from shared_objects.config import FleetConfig
    from shared_objects.messaging import get_transport
    from shared_objects.messaging.memory import MemoryBroker

    cfg = FleetConfig(host="probe")
    cfg.messaging.transport_url = f"memory://fleet-host-probe@probe-{uuid.uuid4().hex}"
    transport = get_transport(cfg.messaging, memory_broker=MemoryBroker())
    agent = ComputeAgentService(cfg, driver=FakeDriver(FakeDriverConfig()), transport=transport)
    return bool(getattr(agent.server, "listen_on_topic", True))


@dataclasses.dataclass(frozen=True, slots=True)
class _Grant:
    """What one login is for: its role, the hosts an agent login serves, its runtime."""

    login: str
    role: Role
    hosts: frozenset[str] = frozenset()
    old_runtime: bool = False


class Ctl(Protocol):
    """How BrokerLogins reaches the broker's administration (rabbitmqctl of some node)."""

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None: ...

    async def delete_users(self, logins: Sequence[str]) -> None: ...


class SetupCtl(Ctl, Protocol):
    """What ``fleetctl broker setup`` needs besides: the broker's current definitions."""

    async def export_definitions(self) -> dict[str, Any]: ...


class Rabbitmqctl:
    """``rabbitmqctl`` run as asyncio subprocesses (never blocking the loop).

    The default is the machine's shared broker through the distribution's wrapper (which
    switches to the ``rabbitmq`` user and its cookie; definitions therefore go in on stdin, not
    through a file that user might not read). ``node`` adds ``-n <node>``; ``env`` replaces the
    environment (a private node's cookie and config).
    """

    def __init__(
        self,
        executable: str | None = None,
        *,
        node: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.executable = executable
        self.node = node
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.timeout = timeout

    def _argv(self, args: Sequence[str]) -> list[str]:
        exe = self.executable or shutil.which("rabbitmqctl")
        if exe is None:
            raise CtlError("rabbitmqctl not found: install rabbitmq-server (make services does)")
        return [exe, *(["-n", self.node] if self.node else []), "-q", *args]

    async def run(self, *args: str, stdin: bytes | None = None) -> str:
        """Run one command; its output, or CtlError with it."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(args),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        except OSError as exc:
            raise CtlError(f"cannot run rabbitmqctl: {exc}") from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CtlError(f"rabbitmqctl {args[0]} timed out after {self.timeout}s") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise CtlError(f"rabbitmqctl {args[0]} failed ({proc.returncode}): {text.strip()}")
        return text

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        # No file argument: rabbitmqctl reads the definitions from stdin.
        await self.run("import_definitions", stdin=json.dumps(definitions).encode())

    async def export_definitions(self) -> dict[str, Any]:
        """Everything the broker holds (users with their password hashes and limits, vhosts,
        permissions, topic permissions, policies, exchanges, ...), as one JSON document."""
        text = await self.run("export_definitions", "-", "--format", "json")
        try:
            found = json.loads(text[text.index("{") :])
        except ValueError as exc:
            raise CtlError(f"rabbitmqctl export_definitions: not JSON: {text[:200]!r}") from exc
        if not isinstance(found, dict):
            raise CtlError("rabbitmqctl export_definitions: not a JSON object")
        return found

    async def delete_users(self, logins: Sequence[str]) -> None:
        if not logins:
            return
        try:
            await self.run("eval", _delete_users_expression(logins))
        except CtlError as exc:
            # rabbit_auth_backend_internal is not a public API: fall back to the CLI, one by one.
            log.info("broker_logins_eval_failed", error=str(exc)[:200])
            for login in logins:
                try:
                    await self.run("delete_user", login)
                except CtlError as one:
                    if "does not exist" not in str(one):
                        raise


def _delete_users_expression(logins: Sequence[str]) -> str:
    for login in logins:
        if not _LOGIN_RE.match(login):
            raise ValueError(f"unsafe broker login {login!r}")
    users = ", ".join(f'<<"{login}">>' for login in logins)
    # One Erlang expression deleting every user (a missing one is skipped, not an error);
    # prints how many were deleted.
    return (
        f"length([ok || U <- [{users}], "
        'ok =:= (catch rabbit_auth_backend_internal:delete_user(U, <<"fleet-broker-logins">>))]).'
    )


class NodeCtl(Rabbitmqctl):
    """rabbitmqctl of a private :class:`~shared_objects.testing.rabbit_node.RabbitNode` (or of
    a :class:`~shared_objects.testing.rabbit_cluster.RabbitCluster`: whichever node is up).

    Runs through the node's own ``ctl`` (its node name, cookie and environment); definitions go
    through a file in the node's private directory, since that ``ctl`` has no stdin.
    """

    def __init__(self, node: RabbitNode | RabbitCluster) -> None:
        super().__init__()
        self.node_handle = node

    async def run(self, *args: str, stdin: bytes | None = None) -> str:
        if stdin is not None:
            raise CtlError("a private node's rabbitmqctl takes no stdin")
        try:
            return await self.node_handle.ctl(*args)
        except Exception as exc:  # RabbitNodeError, TimeoutError
            raise CtlError(str(exc)) from exc

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        path = self.node_handle.base_dir / f"definitions-{uuid.uuid4().hex}.json"
        await asyncio.to_thread(_write_private, path, json.dumps(definitions))
        try:
            await self.run("import_definitions", str(path))
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


class BrokerLogins:
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
        from shared_objects.messaging.urls import parse_transport_url

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

    # --- permissions ------------------------------------------------------------------------

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


# --- a whole deployment: fleetctl broker setup ------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerLimits:
    """The limits ``fleetctl broker setup`` puts on a Fleet vhost (policies and user limits).

    Sizes in messages and bytes, times in seconds; 0 leaves that limit out.
    """

    #: every RPC queue (``<conductor topic>[.<server>]``, ``compute[.<host>]``): a stopped
    #: agent's backlog stops here, further casts and calls are refused (``overflow`` below).
    rpc_max_length: int = 10_000
    rpc_max_bytes: int = 64 * 1024 * 1024
    #: reply queues: a reply older than the call's timeout is useless to the caller.
    reply_max_length: int = 1_000
    reply_ttl: float = 60.0
    #: fanout queues (``<topic>_fanout_<server>_<hex>``): broadcast casts are refresh notices.
    fanout_max_length: int = 1_000
    fanout_ttl: float = 600.0
    #: ``versioned_notifications.<priority>``: the oldest are dropped first (drop-head), so an
    #: absent listener never makes an agent's work fail; kept for ``notifications_ttl``.
    notifications_max_length: int = 10_000
    notifications_ttl: float = 86_400.0
    #: per-login connection and channel limits (``rabbitmqctl set_user_limits``); conductors
    #: have none.
    agent_max_connections: int = 8
    agent_max_channels: int = 64
    operator_max_connections: int = 8
    operator_max_channels: int = 64


def _policy(
    vhost: str, name: str, pattern: str, priority: int, definition: dict[str, Any]
) -> dict[str, Any]:
    return {
        "vhost": vhost,
        "name": name,
        "pattern": pattern,
        "apply-to": "queues",
        "priority": priority,
        "definition": {k: v for k, v in definition.items() if v},
    }


def password_matches(password: str, password_hash: str) -> bool:
    """Whether ``password`` is the one behind RabbitMQ's ``rabbit_password_hashing_sha256``."""
    try:
        raw = base64.b64decode(password_hash, validate=True)
    except ValueError:
        return False
    return len(raw) == 36 and hash_password(password, raw[:4]) == password_hash


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


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


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
