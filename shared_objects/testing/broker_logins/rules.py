"""The vocabulary of broker permissions: permission values, the regex pieces they are built
from, RabbitMQ's password hash, and what this tree's runtime needs (asked of the code itself).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import uuid
from collections.abc import Iterable

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.identity import Role
from shared_objects.runtime.messaging.topology import REPLY_EXCHANGE

# The name RabbitMQ checks permissions on when a message goes to the default exchange ("").
AMQP_DEFAULT_EXCHANGE = "amq.default"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
COMPUTE_TOPIC = "compute"
NOTIFICATION_TOPICS = ("versioned_notifications",)
NOTIFICATION_PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")
_HEX32 = "[0-9a-f]{32}"
#: The exchange Fleet replies travel through (``shared_objects.runtime.messaging.topology``).
REPLY_EXCHANGE_NAME = REPLY_EXCHANGE.name
# The characters of a login (no ``_``: it separates the login in ``reply_<login>_<hex>``).
_LOGIN_CHARS = "[A-Za-z0-9.@+-]"
# Logins go into URLs, JSON and an Erlang expression: keep them to a safe alphabet.
_LOGIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,254}$")


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
    from shared_objects.runtime.messaging import get_transport
    from shared_objects.runtime.messaging.memory import MemoryBroker

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
    from shared_objects.runtime.config import FleetConfig
    from shared_objects.runtime.messaging import get_transport
    from shared_objects.runtime.messaging.memory import MemoryBroker

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


def password_matches(password: str, password_hash: str) -> bool:
    """Whether ``password`` is the one behind RabbitMQ's ``rabbit_password_hashing_sha256``."""
    try:
        raw = base64.b64decode(password_hash, validate=True)
    except ValueError:
        return False
    return len(raw) == 36 and hash_password(password, raw[:4]) == password_hash
