"""Fleet configuration: defaults, overridden by a TOML file, overridden by ``FLEET_*`` variables.

Precedence, lowest to highest:

1. the defaults declared on the dataclasses below;
2. the TOML file named by ``--config PATH`` (or ``FLEET_CONFIG``), one table per section;
3. environment variables: the generic form ``FLEET_<SECTION>__<KEY>`` (for example
   ``FLEET_MESSAGING__HEARTBEAT=10``; ``FLEET_HOST`` for the top-level ``host``) and the short
   aliases in ``ENV_ALIASES`` (``FLEET_TRANSPORT_URL``, ``FLEET_DATABASE_URL``, ...).

Everything is validated once, at start: an unknown key, a bad URL or a bad number raises
``ConfigError`` whose message is one line naming the key. ``load_config_or_exit`` turns that
into a message on stderr and exit status 2, the way daemons report a broken config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl

from shared_objects.url_secrets import HostPart, mask_url, split_authority

__all__ = [
    "ENV_ALIASES",
    "ComputeConfig",
    "ConductorConfig",
    "ConfigError",
    "DatabaseConfig",
    "FleetConfig",
    "LoggingConfig",
    "MessagingConfig",
    "ServiceConfig",
    "UpgradeLevelsConfig",
    "add_config_arguments",
    "config_from_args",
    "format_config",
    "load_config",
    "load_config_or_exit",
    "mask_url",
    "option_names",
]


class ConfigError(ValueError):
    """The configuration cannot be used; ``str(error)`` is one line that names the key."""


# A validator receives the already type-converted value and returns an error text or None.
Check = Callable[[Any], "str | None"]


def _meta(check: Check | None = None, secret: bool = False) -> dict[str, Any]:
    return {"check": check, "secret": secret}


def _min(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v!r}"


def _between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be {low}..{high}, got {v!r}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a TCP port 0..65535, got {v!r}"


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


# The schemes shared_objects.messaging.urls accepts ("rabbits"/"amqps" mean TLS).
TRANSPORT_SCHEMES = ("rabbit", "rabbits", "amqp", "amqps", "memory")
DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")


def _check_hostports(parts: Sequence[HostPart]) -> str | None:
    """Each ``host[:port]``; errors show the host part only, never the user-info before it."""
    for part in parts:
        hostport = part.hostport
        if hostport.startswith("["):
            host, _, after = hostport[1:].partition("]")
            port = after[1:]
            if after and not after.startswith(":"):
                return f"has a bad host:port {hostport!r}"
        else:
            host, _, port = hostport.partition(":")
        if not host:
            return f"has an empty host in {hostport!r}"
        if port and not (port.isdigit() and int(port) <= 65535):
            return f"has a bad host:port {hostport!r} (the port must be 0..65535)"
    return None


def _check_transport_url(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"is not a URL (expected e.g. rabbit://user:pass@127.0.0.1:5672/): {mask_url(url)!r}"
    if scheme.lower() not in TRANSPORT_SCHEMES:
        return f"scheme must be one of {', '.join(TRANSPORT_SCHEMES)}; got {scheme!r}"
    if scheme.lower() == "memory":
        return None
    parts, tail = split_authority(rest)
    if not parts:
        error = None  # oslo.messaging's "rabbit:///": guest@localhost, the runtime's default
    else:
        # oslo.messaging allows several brokers: rabbit://u:p@h1:5672,u:p@h2:5672/vhost
        error = _check_hostports(parts)
    if error:
        return error
    options = dict(parse_qsl(tail.partition("?")[2], keep_blank_values=True))
    auth = options.get("auth", "plain").lower()
    if auth not in ("plain", "external"):
        return f"auth must be plain or external; got {auth!r}"
    tls = scheme.lower() in ("amqps", "rabbits") or options.get("ssl", "").lower() in _TRUE
    if auth == "external" and not (tls and options.get("certfile")):
        return "auth=external (x509 client-certificate login) needs TLS (amqps://) and certfile="
    if options.get("keyfile") and not options.get("certfile"):
        return "keyfile= is given without certfile="
    return None


# libpq's sslmode values; "verify-ca"/"verify-full" check the server certificate.
DATABASE_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_database_url(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"is not a URL (expected e.g. sqlite+aiosqlite:///fleet.db): {mask_url(url)!r}"
    if scheme not in DATABASE_SCHEMES:
        return f"scheme must be one of {', '.join(DATABASE_SCHEMES)}; got {scheme!r}"
    if scheme.startswith("postgresql"):
        parts, tail = split_authority(rest)
        path, _, query = tail.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        if len(parts) > 1:
            return f"names several hosts ({len(parts)}); Fleet connects to one: {mask_url(url)!r}"
        if not parts or not parts[0].hostport:
            if "host" not in options:
                return f"has no host: {mask_url(url)!r}"
        else:
            error = _check_hostports(parts)
            if error:
                return error
        if not path.strip("/"):
            return f"names no database: {mask_url(url)!r}"
        if "sslmode" in options and "ssl" in options:
            return "sets both sslmode= and ssl=; use sslmode="
        mode = options.get("sslmode", options.get("ssl"))
        if mode is not None and mode not in DATABASE_SSLMODES:
            return f"sslmode must be one of {', '.join(DATABASE_SSLMODES)}; got {mode!r}"
    return None


def _check_version_cap(v: str) -> str | None:
    # The same rule as shared_objects.upgrade_levels.parse_level, checked here so that a level
    # no release knows is a configuration error (and --print-config shows none).
    from shared_objects import releases

    known = {"auto"} | {r.name for r in releases.RELEASES}
    known |= {r.compute_rpc_api for r in releases.RELEASES}
    if v in known:
        return None
    choices = ", ".join(sorted(known))
    return f"must be one of {choices} (auto, a release name or a compute RPC version); got {v!r}"


def _check_host(v: str) -> str | None:
    if not v.strip():
        return "must not be empty"
    # The host name becomes part of queue names and routing keys.
    if any(c.isspace() for c in v):
        return f"must be a host name without spaces; got {v!r}"
    return None


@dataclasses.dataclass(slots=True)
class MessagingConfig:
    """How to reach RabbitMQ and how the RPC runtime uses it (oslo.messaging option names)."""

    transport_url: str = dataclasses.field(
        default="rabbit://guest:guest@127.0.0.1:5672/",
        metadata=_meta(_check_transport_url, secret=True),
    )
    # A file holding the transport URL (e.g. a systemd credential: "%d/transport_url" in the
    # unit); replaces transport_url, which must then not be set as well. Not a secret itself.
    transport_url_file: str = ""
    # Allow ?no_verify_ssl=1 on the transport URL (TLS without checking the broker's
    # certificate). Refused unless this is true, and logged at WARNING at start even then.
    tls_insecure: bool = False
    control_exchange: str = dataclasses.field(default="fleet", metadata=_meta(_non_empty))
    heartbeat: int = dataclasses.field(default=20, metadata=_meta(_min(0)))
    rpc_response_timeout: float = dataclasses.field(default=60.0, metadata=_meta(_positive))
    amqp_durable_queues: bool = False
    amqp_auto_delete: bool = False
    rabbit_quorum_queue: bool = False
    rabbit_transient_quorum_queue: bool = False
    rabbit_transient_queues_ttl: int = dataclasses.field(default=1800, metadata=_meta(_min(1)))
    rabbit_qos_prefetch_count: int = dataclasses.field(default=64, metadata=_meta(_min(0)))
    max_concurrency: int = dataclasses.field(default=64, metadata=_meta(_min(1)))
    publisher_confirms: bool = True
    # Largest message body a service decodes (requests and replies); bigger ones are refused
    # before any JSON decoding. 8 MiB: a 1000-instance InstanceList reply is 1.3 MB, so ~6000
    # instances fit; half of the broker-side cap Fleet ships (deploy/rabbitmq/20-fleet-limits.conf).
    max_message_bytes: int = dataclasses.field(
        default=8 * 1024 * 1024, metadata=_meta(_between(4096, 512 * 1024 * 1024))
    )
    # Deepest JSON nesting a service decodes (arrays/objects); deeper ones are refused before
    # decoding. The deepest legitimate Fleet message measured nests 12 levels.
    max_message_depth: int = dataclasses.field(default=64, metadata=_meta(_between(8, 512)))


@dataclasses.dataclass(slots=True)
class DatabaseConfig:
    """Where the conductor keeps its state. Agents never read this section."""

    url: str = dataclasses.field(
        default="sqlite+aiosqlite:///fleet.db", metadata=_meta(_check_database_url, secret=True)
    )
    # A file holding the database URL (e.g. a systemd credential: "%d/database_url").
    url_file: str = ""


@dataclasses.dataclass(slots=True)
class ServiceConfig:
    """Service lifecycle: liveness reporting, shutdown, the metrics/health endpoint."""

    report_interval: float = dataclasses.field(default=10.0, metadata=_meta(_positive))
    service_down_time: float = dataclasses.field(default=60.0, metadata=_meta(_positive))
    graceful_shutdown_timeout: float = dataclasses.field(default=30.0, metadata=_meta(_min(0)))
    # Seconds an agent's flow (build, delete, volumes, live migration) keeps retrying one call
    # through a database or broker outage before it settles to its failure outcome.
    outage_retry_timeout: float = dataclasses.field(default=120.0, metadata=_meta(_min(0)))
    # Seconds a starting service keeps retrying the broker, the database (conductor) and the
    # first conductor answer (agent), with backoff, before it exits with status 3.
    start_retry_timeout: float = dataclasses.field(default=60.0, metadata=_meta(_min(0)))
    metrics_host: str = dataclasses.field(default="127.0.0.1", metadata=_meta(_non_empty))
    # 0 disables the endpoint: several services on one host would otherwise fight over a port.
    metrics_port: int = dataclasses.field(default=0, metadata=_meta(_port))


@dataclasses.dataclass(slots=True)
class UpgradeLevelsConfig:
    """Version caps for RPC sent to agents (Nova's ``[upgrade_levels]``)."""

    compute: str = dataclasses.field(default="auto", metadata=_meta(_check_version_cap))
    # How often the automatic cap is re-read from the live compute services (also on SIGHUP).
    refresh_interval: float = dataclasses.field(default=30.0, metadata=_meta(_positive))


@dataclasses.dataclass(slots=True)
class ConductorConfig:
    """The conductor's reconciler (``conductor.reconcile``): how often it looks for work left
    in a transitional state with nobody responsible for it, and how long it waits before acting.

    Every bound is in seconds and counts from the row's last change (``updated_at``); a host is
    down once its service is past ``[service] service_down_time``, forced down, or marked down by
    its agent on a graceful stop. See docs/reliability.md for what each rule does.
    """

    # Seconds between two passes; 0 turns the reconciler off.
    reconcile_interval: float = dataclasses.field(default=15.0, metadata=_meta(_min(0)))
    # Rows each rule reads and acts on per pass (the rest waits for the next pass).
    reconcile_batch: int = dataclasses.field(default=500, metadata=_meta(_min(1)))
    # A build assigned to an up host, never taken: re-cast to the same host after this...
    build_recast_after: float = dataclasses.field(default=30.0, metadata=_meta(_positive))
    # ...and placed elsewhere this long after the re-cast, if still not taken.
    build_reschedule_after: float = dataclasses.field(default=120.0, metadata=_meta(_positive))
    # A build waiting to be scheduled with no host at all (legacy hand-back): placed again.
    unassigned_build_after: float = dataclasses.field(default=60.0, metadata=_meta(_positive))
    # A build taken by a host that is down (block_device_mapping: rescheduled; spawning: ERROR).
    build_host_down_after: float = dataclasses.field(default=30.0, metadata=_meta(_min(0)))
    # A delete on an up host that has not finished (its cast was lost, or the agent gave up
    # during an outage): sent to the host again after this, and again each time it passes.
    delete_recast_after: float = dataclasses.field(default=60.0, metadata=_meta(_positive))
    # A delete sent to a host that is down: finished in the database.
    delete_host_down_after: float = dataclasses.field(default=300.0, metadata=_meta(_min(0)))
    # A live migration whose source and destination are both down: failed (or ERROR).
    migration_hosts_down_after: float = dataclasses.field(default=120.0, metadata=_meta(_min(0)))
    # An instance action still open although its instance is in a final state: finished.
    action_settle_after: float = dataclasses.field(default=120.0, metadata=_meta(_positive))
    # The scheduler's cached host view (conductor/host_view.py): a decision sees rows changed up
    # to this long before it, at the cost of at most one delta read per interval...
    host_view_refresh_interval: float = dataclasses.field(default=1.0, metadata=_meta(_min(0)))
    # ...re-reading rows stamped this long before the previous read (writers' clock skew and
    # commit delay)...
    host_view_overlap: float = dataclasses.field(default=2.0, metadata=_meta(_min(0)))
    # ...and everything this often, the backstop for a change a delta missed.
    host_view_full_refresh_interval: float = dataclasses.field(
        default=60.0, metadata=_meta(_positive)
    )


@dataclasses.dataclass(slots=True)
class ComputeConfig:
    """The agent's fake hypervisor: capacity, overcommit, timing, failure injection.

    ``fake_driver_options()`` hands these to ``compute_agent.virt.FakeDriverConfig.from_mapping``;
    the driver's own ``FLEET_FAKE_*`` variables still apply on top (``FakeDriverConfig.from_env``).
    """

    vcpus: int = dataclasses.field(default=32, metadata=_meta(_min(1)))
    memory_mb: int = dataclasses.field(default=131072, metadata=_meta(_min(1)))
    disk_gb: int = dataclasses.field(default=2048, metadata=_meta(_min(1)))
    # One set of ratios for the resource tracker's claims and the hypervisor's own limits, so a
    # claim the agent accepted can never be refused by the driver at spawn time.
    cpu_allocation_ratio: float = dataclasses.field(default=16.0, metadata=_meta(_positive))
    ram_allocation_ratio: float = dataclasses.field(default=1.5, metadata=_meta(_positive))
    disk_allocation_ratio: float = dataclasses.field(default=1.0, metadata=_meta(_positive))
    spawn_delay: float = dataclasses.field(default=0.5, metadata=_meta(_min(0)))
    # Empty: $STATE_DIRECTORY when systemd provides one, else ./fleet-state (see load_config).
    state_dir: str = ""
    # Failure injection, "step[:count][:option...]" items (compute_agent.virt.failures).
    failures: str = ""
    # Live-migration model overrides, "key=value,..." (compute_agent.virt.migration_model).
    migration: str = ""
    # fsync every state write (only matters for power loss, not for a killed process).
    fsync: bool = False
    # Name the hypervisor reports; empty: the host name.
    hypervisor_hostname: str = ""

    def fake_driver_options(self) -> dict[str, Any]:
        """These options under ``FakeDriverConfig`` field names (empty strings left out)."""
        options: dict[str, Any] = {
            "state_dir": self.state_dir,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "local_gb": self.disk_gb,
            "cpu_allocation_ratio": self.cpu_allocation_ratio,
            "ram_allocation_ratio": self.ram_allocation_ratio,
            "disk_allocation_ratio": self.disk_allocation_ratio,
            "spawn_delay_s": self.spawn_delay,
            "failures": self.failures,
            "migration": self.migration,
            "fsync": self.fsync,
            "hypervisor_hostname": self.hypervisor_hostname,
        }
        return {k: v for k, v in options.items() if v != ""}


def _check_login_patterns(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must name at least one login (pattern)"
    bad = [p for p in v if not p.strip() or any(c.isspace() for c in p)]
    return f"login patterns must be non-empty and without spaces; got {bad!r}" if bad else None


def _check_login_prefix(v: str) -> str | None:
    if not v or any(c.isspace() or c in "*?[]" for c in v):
        return f"must be a non-empty login prefix without spaces or wildcards; got {v!r}"
    return None


def _check_hosts(v: tuple[str, ...]) -> str | None:
    bad = [h for h in v if _check_host(h)]
    return f"must be host names; got {bad!r}" if bad else None


@dataclasses.dataclass(slots=True)
class SecurityConfig:
    """Who may call what: broker logins and the roles they map to (docs/security.md).

    The role of a caller comes only from its broker-validated AMQP ``user_id`` (its login):
    logins matching ``conductor_logins`` are conductors, ``operator_logins`` operators, and
    ``<host_login_prefix><host>`` is the agent of ``<host>``. During a rolling upgrade from a
    release that shared one login between hosts, ``legacy_shared_login`` may speak for the hosts
    listed in ``legacy_hosts`` (and only those); both are empty in a new deployment.
    """

    conductor_logins: tuple[str, ...] = dataclasses.field(
        default=("fleet-conductor", "fleet-conductor-*"), metadata=_meta(_check_login_patterns)
    )
    operator_logins: tuple[str, ...] = dataclasses.field(
        default=("fleet-operator", "fleet-operator-*"), metadata=_meta(_check_login_patterns)
    )
    host_login_prefix: str = dataclasses.field(
        default="fleet-host-", metadata=_meta(_check_login_prefix)
    )
    legacy_shared_login: str = ""
    legacy_hosts: tuple[str, ...] = dataclasses.field(default=(), metadata=_meta(_check_hosts))


@dataclasses.dataclass(slots=True)
class NotificationsConfig:
    """Versioned notifications (``versioned_notifications.<priority>`` on the control exchange).

    Off: the agents publish nothing and declare no notification queue. On, the queue is bounded
    by the broker policy ``fleetctl broker setup`` installs (docs/operations.md).
    """

    enabled: bool = True


@dataclasses.dataclass(slots=True)
class LoggingConfig:
    """Log output: JSON lines for machines, readable text for people."""

    format: str = dataclasses.field(
        default="auto", metadata=_meta(_one_of("auto", "json", "console"))
    )
    level: str = dataclasses.field(
        default="info", metadata=_meta(_one_of("debug", "info", "warning", "error", "critical"))
    )


@dataclasses.dataclass(slots=True)
class FleetConfig:
    """The whole effective configuration of one Fleet process."""

    host: str = dataclasses.field(default_factory=socket.gethostname, metadata=_meta(_check_host))
    messaging: MessagingConfig = dataclasses.field(default_factory=MessagingConfig)
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)
    upgrade_levels: UpgradeLevelsConfig = dataclasses.field(default_factory=UpgradeLevelsConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    conductor: ConductorConfig = dataclasses.field(default_factory=ConductorConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    notifications: NotificationsConfig = dataclasses.field(default_factory=NotificationsConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


# Short environment names for the options people set most; each maps to (section, key).
ENV_ALIASES: dict[str, tuple[str | None, str]] = {
    "FLEET_HOST": (None, "host"),
    "FLEET_TRANSPORT_URL": ("messaging", "transport_url"),
    "FLEET_CONTROL_EXCHANGE": ("messaging", "control_exchange"),
    "FLEET_DATABASE_URL": ("database", "url"),
    "FLEET_LOG_FORMAT": ("logging", "format"),
    "FLEET_LOG_LEVEL": ("logging", "level"),
    "FLEET_METRICS_HOST": ("service", "metrics_host"),
    "FLEET_METRICS_PORT": ("service", "metrics_port"),
    "FLEET_COMPUTE_VERSION_CAP": ("upgrade_levels", "compute"),
    "FLEET_STATE_DIR": ("compute", "state_dir"),
}
ENV_PREFIX = "FLEET_"
CONFIG_FILE_ENV = "FLEET_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(FleetConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FleetConfig) if f.name != "host"}


def _field(cls: type, key: str) -> tuple[dataclasses.Field[Any], type] | None:
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f, typing.get_type_hints(cls)[key]
    return None


def _convert(name: str, kind: type, value: Any, *, from_env: bool) -> Any:
    """``value`` as ``kind`` (str/int/float/bool/tuple of str), or ConfigError naming ``name``."""
    if kind == tuple[str, ...]:
        # A list: comma-separated in the environment, a TOML array of strings in a file.
        if from_env:
            return tuple(item.strip() for item in str(value).split(",") if item.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    if from_env:
        text = str(value).strip()
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ConfigError(f"{name}: expected a boolean (true/false), got {text!r}")
        if kind is int:
            try:
                return int(text, 10)
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
        if kind is float:
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {text!r}") from None
            if not math.isfinite(number):
                raise ConfigError(f"{name}: expected a finite number, got {text!r}")
            return number
        return str(value)
    # From TOML: the file already has types; accept an int where a float is wanted, nothing else.
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{name}: expected a string, got {value!r}")


# Where each option was last set ("/etc/fleet/fleet.toml: [service] metrics_port", "FLEET_..."),
# so that a value that fails validation is reported under the name the user actually typed.
Origins = dict[tuple[str | None, str], str]


def _assign(
    cfg: FleetConfig,
    section: str | None,
    key: str,
    value: Any,
    origin: str,
    origins: Origins,
    *,
    from_env: bool,
) -> None:
    """Set one option; ``origin`` is how the error message names it (file key or variable)."""
    target: Any = cfg if section is None else getattr(cfg, section)
    found = _field(type(target), key)
    if found is None or (section is None and key != "host"):
        raise ConfigError(f"{origin}: unknown option")
    field, kind = found
    try:
        converted = _convert(origin, kind, value, from_env=from_env)
    except ConfigError:
        if not field.metadata.get("secret"):
            raise
        # The value may hold a password: name the key, not the value.
        raise ConfigError(
            f"{origin}: expected a string (value not shown: may hold a secret)"
        ) from None
    setattr(target, key, converted)
    origins[(section, key)] = origin


def _apply_file(cfg: FleetConfig, path: Path, origins: Origins) -> None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    sections = _sections()
    for name, value in data.items():
        if name == "host":
            _assign(cfg, None, "host", value, f"{path}: host", origins, from_env=False)
        elif name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            for key, item in value.items():
                _assign(cfg, name, key, item, f"{path}: [{name}] {key}", origins, from_env=False)
        else:
            raise ConfigError(f"{path}: unknown section or option {name!r}")


def _apply_env(cfg: FleetConfig, env: Mapping[str, str], origins: Origins) -> None:
    sections = _sections()
    # Generic names first, aliases last: the short name is the one people type by hand.
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        if section not in sections:
            raise ConfigError(f"{var}: unknown section {section!r}")
        _assign(cfg, section, key, env[var], var, origins, from_env=True)
    for var, (alias_section, alias_key) in ENV_ALIASES.items():
        if var in env:
            _assign(cfg, alias_section, alias_key, env[var], var, origins, from_env=True)


def _validate(cfg: FleetConfig, origins: Origins) -> None:
    groups: list[tuple[str | None, Any]] = [(None, cfg)]
    groups += [(name, getattr(cfg, name)) for name in _sections()]
    for section, obj in groups:
        for f in dataclasses.fields(obj):
            check = f.metadata.get("check")
            if check is None:
                continue
            error = check(getattr(obj, f.name))
            if error:
                default = f.name if section is None else f"[{section}] {f.name}"
                where = origins.get((section, f.name), default)
                raise ConfigError(f"{where}: {error}")
    if cfg.service.service_down_time <= cfg.service.report_interval:
        raise ConfigError(
            "[service] service_down_time: must be greater than report_interval "
            f"({cfg.service.service_down_time:g} <= {cfg.service.report_interval:g}), "
            "or every service would look down between two reports"
        )
    _check_tls_policy(cfg, origins)


# (section, option holding a file name, option the file's content replaces)
SECRET_FILE_OPTIONS = (
    ("messaging", "transport_url_file", "transport_url"),
    ("database", "url_file", "url"),
)


def _read_secret_files(cfg: FleetConfig, origins: Origins) -> None:
    """Replace each URL by the content of its ``*_file`` option, when that option is set."""
    for section, file_key, key in SECRET_FILE_OPTIONS:
        obj = getattr(cfg, section)
        path = getattr(obj, file_key)
        if not path:
            continue
        file_origin = origins.get((section, file_key), f"[{section}] {file_key}")
        if (section, key) in origins:
            raise ConfigError(
                f"{file_origin}: {origins[(section, key)]} is set too; set only one of them"
            )
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            raise ConfigError(f"{file_origin}: cannot read {path}: {reason}") from None
        if not text or "\n" in text:
            raise ConfigError(f"{file_origin}: {path} must hold exactly one line (the URL)")
        setattr(obj, key, text)
        origins[(section, key)] = f"{file_origin} ({path})"


def _check_tls_policy(cfg: FleetConfig, origins: Origins) -> None:
    """Certificate verification can be turned off only explicitly (``tls_insecure``)."""
    url = cfg.messaging.transport_url
    options = dict(parse_qsl(split_authority(url.partition("://")[2])[1].partition("?")[2]))
    if options.get("no_verify_ssl", "0") not in ("", "0") and not cfg.messaging.tls_insecure:
        where = origins.get(("messaging", "transport_url"), "[messaging] transport_url")
        raise ConfigError(
            f"{where}: no_verify_ssl turns off the broker certificate check; refused unless "
            "[messaging] tls_insecure = true"
        )


def load_config(
    environ: Mapping[str, str] | None = None, path: str | os.PathLike[str] | None = None
) -> FleetConfig:
    """The effective configuration: defaults, then the TOML file, then ``FLEET_*`` variables.

    ``path`` wins over ``$FLEET_CONFIG``; with neither, no file is read. Raises ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    cfg = FleetConfig()
    origins: Origins = {}
    file_path = path if path is not None else env.get(CONFIG_FILE_ENV) or None
    if file_path is not None:
        _apply_file(cfg, Path(file_path), origins)
    _apply_env(cfg, env, origins)
    if not cfg.compute.state_dir:
        # systemd's StateDirectory= hands the service its directory in $STATE_DIRECTORY.
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        cfg.compute.state_dir = state or "fleet-state"
    _read_secret_files(cfg, origins)
    _validate(cfg, origins)
    return cfg


def load_config_or_exit(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> FleetConfig:
    """``load_config`` for a program's ``main``: on error print one line to stderr, exit 2."""
    try:
        return load_config(environ, path=path)
    except ConfigError as exc:
        _exit_config_error(exc, prog)


def _exit_config_error(exc: ConfigError, prog: str | None) -> NoReturn:
    name = prog or Path(sys.argv[0]).name or "fleet"
    print(f"{name}: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the standard ``--config PATH`` and ``--print-config`` options to a service's parser."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML configuration file (default: ${CONFIG_FILE_ENV}, else built-in defaults)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (secrets masked) and exit",
    )


def config_from_args(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> FleetConfig:
    """The config named by ``args``: exit 2 on error; print it and exit 0 for --print-config.

    A ``--host`` option, where the program has one, overrides the config (and is what
    ``--print-config`` shows: exactly what would run)."""
    cfg = load_config_or_exit(getattr(args, "config", None), environ, prog)
    host = getattr(args, "host", None)
    if host is not None:
        error = _check_host(host)
        if error is not None:
            _exit_config_error(ConfigError(f"--host: {error}"), prog)
        cfg.host = host
    if getattr(args, "print_config", False):
        sys.stdout.write(format_config(cfg))
        raise SystemExit(0)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def format_config(cfg: FleetConfig) -> str:
    """The effective configuration as TOML text, passwords masked (for ``--print-config``)."""
    lines = [f"host = {_toml_value(cfg.host)}"]
    for section in _sections():
        obj = getattr(cfg, section)
        lines.append("")
        lines.append(f"[{section}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("secret"):
                value = mask_url(value)
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def option_names() -> Sequence[tuple[str | None, str]]:
    """Every (section, key) the loader accepts; docs and examples are tested against it."""
    names: list[tuple[str | None, str]] = [(None, "host")]
    for section, cls in _sections().items():
        names += [(section, f.name) for f in dataclasses.fields(cls)]
    return names
