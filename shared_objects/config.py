"""Fleet configuration: defaults, overridden by a TOML file, overridden by ``FLEET_*`` variables.

Minimal first version; the full loader (TOML file, validation, ``--print-config``) grows here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping


@dataclasses.dataclass(slots=True)
class MessagingConfig:
    transport_url: str = "rabbit://guest:guest@127.0.0.1:5672/"
    control_exchange: str = "fleet"
    heartbeat: int = 20
    rpc_response_timeout: float = 60.0
    amqp_durable_queues: bool = False
    amqp_auto_delete: bool = False
    rabbit_quorum_queue: bool = False
    rabbit_transient_quorum_queue: bool = False
    rabbit_transient_queues_ttl: int = 1800
    rabbit_qos_prefetch_count: int = 64
    max_concurrency: int = 64
    publisher_confirms: bool = True


@dataclasses.dataclass(slots=True)
class DatabaseConfig:
    url: str = "sqlite+aiosqlite:///fleet.db"


@dataclasses.dataclass(slots=True)
class FleetConfig:
    host: str = dataclasses.field(default_factory=socket.gethostname)
    messaging: MessagingConfig = dataclasses.field(default_factory=MessagingConfig)
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)


def load_config(environ: Mapping[str, str] | None = None) -> FleetConfig:
    """Effective configuration from the environment."""
    env = os.environ if environ is None else environ
    cfg = FleetConfig()
    if "FLEET_HOST" in env:
        cfg.host = env["FLEET_HOST"]
    if "FLEET_TRANSPORT_URL" in env:
        cfg.messaging.transport_url = env["FLEET_TRANSPORT_URL"]
    if "FLEET_CONTROL_EXCHANGE" in env:
        cfg.messaging.control_exchange = env["FLEET_CONTROL_EXCHANGE"]
    if "FLEET_DATABASE_URL" in env:
        cfg.database.url = env["FLEET_DATABASE_URL"]
    return cfg
