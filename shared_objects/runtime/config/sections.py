"""The sections of the configuration: one dataclass each, defaults and checks declared on the
fields (``meta(check, secret=...)``), all held by ``FleetConfig``."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from shared_objects.runtime.config._checks import (
    at_least,
    between,
    check_database_url,
    check_host,
    check_hosts,
    check_login_patterns,
    check_login_prefix,
    check_transport_url,
    check_version_cap,
    meta,
    non_empty,
    one_of,
    port,
    positive,
)


@dataclasses.dataclass(slots=True)
class MessagingConfig:
    """How to reach RabbitMQ and how the RPC runtime uses it (oslo.messaging option names)."""

    transport_url: str = dataclasses.field(
        default="rabbit://guest:guest@127.0.0.1:5672/",
        metadata=meta(check_transport_url, secret=True),
    )
    # A file holding the transport URL (e.g. a systemd credential: "%d/transport_url" in the
    # unit); replaces transport_url, which must then not be set as well. Not a secret itself.
    transport_url_file: str = ""
    # Allow ?no_verify_ssl=1 on the transport URL (TLS without checking the broker's
    # certificate). Refused unless this is true, and logged at WARNING at start even then.
    tls_insecure: bool = False
    control_exchange: str = dataclasses.field(default="fleet", metadata=meta(non_empty))
    heartbeat: int = dataclasses.field(default=20, metadata=meta(at_least(0)))
    rpc_response_timeout: float = dataclasses.field(default=60.0, metadata=meta(positive))
    amqp_durable_queues: bool = False
    amqp_auto_delete: bool = False
    rabbit_quorum_queue: bool = False
    rabbit_transient_quorum_queue: bool = False
    rabbit_transient_queues_ttl: int = dataclasses.field(default=1800, metadata=meta(at_least(1)))
    rabbit_qos_prefetch_count: int = dataclasses.field(default=64, metadata=meta(at_least(0)))
    max_concurrency: int = dataclasses.field(default=64, metadata=meta(at_least(1)))
    publisher_confirms: bool = True
    # Largest message body a service decodes (requests and replies); bigger ones are refused
    # before any JSON decoding. 8 MiB: a 1000-instance InstanceList reply is 1.3 MB, so ~6000
    # instances fit; half of the broker-side cap Fleet ships (deploy/rabbitmq/20-fleet-limits.conf).
    max_message_bytes: int = dataclasses.field(
        default=8 * 1024 * 1024, metadata=meta(between(4096, 512 * 1024 * 1024))
    )
    # Deepest JSON nesting a service decodes (arrays/objects); deeper ones are refused before
    # decoding. The deepest legitimate Fleet message measured nests 12 levels.
    max_message_depth: int = dataclasses.field(default=64, metadata=meta(between(8, 512)))


@dataclasses.dataclass(slots=True)
class DatabaseConfig:
    """Where the conductor keeps its state. Agents never read this section."""

    url: str = dataclasses.field(
        default="sqlite+aiosqlite:///fleet.db", metadata=meta(check_database_url, secret=True)
    )
    # A file holding the database URL (e.g. a systemd credential: "%d/database_url").
    url_file: str = ""


@dataclasses.dataclass(slots=True)
class ServiceConfig:
    """Service lifecycle: liveness reporting, shutdown, the metrics/health endpoint."""

    report_interval: float = dataclasses.field(default=10.0, metadata=meta(positive))
    service_down_time: float = dataclasses.field(default=60.0, metadata=meta(positive))
    graceful_shutdown_timeout: float = dataclasses.field(default=30.0, metadata=meta(at_least(0)))
    # Seconds an agent's flow (build, delete, volumes, live migration) keeps retrying one call
    # through a database or broker outage before it settles to its failure outcome.
    outage_retry_timeout: float = dataclasses.field(default=120.0, metadata=meta(at_least(0)))
    # Seconds a starting service keeps retrying the broker, the database (conductor) and the
    # first conductor answer (agent), with backoff, before it exits with status 3.
    start_retry_timeout: float = dataclasses.field(default=60.0, metadata=meta(at_least(0)))
    metrics_host: str = dataclasses.field(default="127.0.0.1", metadata=meta(non_empty))
    # 0 disables the endpoint: several services on one host would otherwise fight over a port.
    metrics_port: int = dataclasses.field(default=0, metadata=meta(port))


@dataclasses.dataclass(slots=True)
class UpgradeLevelsConfig:
    """Version caps for RPC sent to agents (Nova's ``[upgrade_levels]``)."""

    compute: str = dataclasses.field(default="auto", metadata=meta(check_version_cap))
    # How often the automatic cap is re-read from the live compute services (also on SIGHUP).
    refresh_interval: float = dataclasses.field(default=30.0, metadata=meta(positive))


@dataclasses.dataclass(slots=True)
class ConductorConfig:
    """The conductor's reconciler (``conductor.reconcile``): how often it looks for work left
    in a transitional state with nobody responsible for it, and how long it waits before acting.

    Every bound is in seconds and counts from the row's last change (``updated_at``); a host is
    down once its service is past ``[service] service_down_time``, forced down, or marked down by
    its agent on a graceful stop. See docs/reliability.md for what each rule does.
    """

    # Seconds between two passes; 0 turns the reconciler off.
    reconcile_interval: float = dataclasses.field(default=15.0, metadata=meta(at_least(0)))
    # Rows each rule reads and acts on per pass (the rest waits for the next pass).
    reconcile_batch: int = dataclasses.field(default=500, metadata=meta(at_least(1)))
    # A build assigned to an up host, never taken: re-cast to the same host after this...
    build_recast_after: float = dataclasses.field(default=30.0, metadata=meta(positive))
    # ...and placed elsewhere this long after the re-cast, if still not taken.
    build_reschedule_after: float = dataclasses.field(default=120.0, metadata=meta(positive))
    # A build waiting to be scheduled with no host at all (legacy hand-back): placed again.
    unassigned_build_after: float = dataclasses.field(default=60.0, metadata=meta(positive))
    # A build taken by a host that is down (block_device_mapping: rescheduled; spawning: ERROR).
    build_host_down_after: float = dataclasses.field(default=30.0, metadata=meta(at_least(0)))
    # A delete on an up host that has not finished (its cast was lost, or the agent gave up
    # during an outage): sent to the host again after this, and again each time it passes.
    delete_recast_after: float = dataclasses.field(default=60.0, metadata=meta(positive))
    # A delete sent to a host that is down: finished in the database.
    delete_host_down_after: float = dataclasses.field(default=300.0, metadata=meta(at_least(0)))
    # A live migration whose source and destination are both down: failed (or ERROR).
    migration_hosts_down_after: float = dataclasses.field(default=120.0, metadata=meta(at_least(0)))
    # An instance action still open although its instance is in a final state: finished.
    action_settle_after: float = dataclasses.field(default=120.0, metadata=meta(positive))
    # The scheduler's cached host view (conductor/host_view.py): a decision sees rows changed up
    # to this long before it, at the cost of at most one delta read per interval...
    host_view_refresh_interval: float = dataclasses.field(default=1.0, metadata=meta(at_least(0)))
    # ...re-reading rows stamped this long before the previous read (writers' clock skew and
    # commit delay)...
    host_view_overlap: float = dataclasses.field(default=2.0, metadata=meta(at_least(0)))
    # ...and everything this often, the backstop for a change a delta missed.
    host_view_full_refresh_interval: float = dataclasses.field(
        default=60.0, metadata=meta(positive)
    )


@dataclasses.dataclass(slots=True)
class ComputeConfig:
    """The agent's fake hypervisor: capacity, overcommit, timing, failure injection.

    ``fake_driver_options()`` hands these to ``compute_agent.virt.FakeDriverConfig.from_mapping``.
    The syntax of ``failures`` and ``migration`` belongs to the driver: the agent checks it when
    it builds its hypervisor at start, and a bad value is a configuration error there (exit 2).
    """

    vcpus: int = dataclasses.field(default=32, metadata=meta(at_least(1)))
    memory_mb: int = dataclasses.field(default=131072, metadata=meta(at_least(1)))
    disk_gb: int = dataclasses.field(default=2048, metadata=meta(at_least(1)))
    # One set of ratios for the resource tracker's claims and the hypervisor's own limits, so a
    # claim the agent accepted can never be refused by the driver at spawn time.
    cpu_allocation_ratio: float = dataclasses.field(default=16.0, metadata=meta(positive))
    ram_allocation_ratio: float = dataclasses.field(default=1.5, metadata=meta(positive))
    disk_allocation_ratio: float = dataclasses.field(default=1.0, metadata=meta(positive))
    spawn_delay: float = dataclasses.field(default=0.5, metadata=meta(at_least(0)))
    # Empty: $STATE_DIRECTORY when systemd provides one, else ./fleet-state (see load_config).
    state_dir: str = ""
    # Failure injection, "step[:count][:option...]" items (compute_agent.virt.failures).
    failures: str = ""
    # A file holding more failure rules in the same syntax, re-read whenever it changes (so a
    # test can change the failures of an agent that is already running); empty: none.
    failures_file: str = ""
    # Live-migration model overrides, "key=value,..." (compute_agent.virt.migration_model).
    migration: str = ""
    # fsync every state write (only matters for power loss, not for a killed process).
    fsync: bool = False
    # Name the hypervisor reports; empty: the host name.
    hypervisor_hostname: str = ""
    # The hypervisor: "fake" (simulated, the default) or "qemu" (real guests, docs/virt.md).
    driver: str = dataclasses.field(default="fake", metadata=meta(one_of("fake", "qemu")))
    # QEMU driver only: image catalogue (empty: ~/.cache/fleet/images), volume files (empty:
    # <state_dir>/volumes), binary, accelerator (kvm:tcg, tcg, kvm), RAM of each guest (MiB,
    # 0 = the flavor's), seconds to the first heartbeat and for a detach's DEVICE_DELETED.
    qemu_image_dir: str = ""
    qemu_volume_dir: str = ""
    qemu_binary: str = "qemu-system-x86_64"
    qemu_accel: str = dataclasses.field(
        default="kvm:tcg", metadata=meta(one_of("kvm:tcg", "tcg", "kvm"))
    )
    qemu_memory_mb: int = dataclasses.field(default=128, metadata=meta(at_least(0)))
    qemu_boot_timeout: float = dataclasses.field(default=90.0, metadata=meta(positive))
    qemu_detach_timeout: float = dataclasses.field(default=10.0, metadata=meta(positive))

    def qemu_driver_options(self) -> dict[str, Any]:
        """The options of the QEMU driver under ``QemuDriverConfig`` field names."""
        options: dict[str, Any] = {
            "state_dir": self.state_dir,
            "image_dir": self.qemu_image_dir,
            "volume_dir": self.qemu_volume_dir,
            "qemu_binary": self.qemu_binary,
            "accel": self.qemu_accel,
            "guest_memory_mb": self.qemu_memory_mb,
            "boot_timeout_s": self.qemu_boot_timeout,
            "detach_timeout_s": self.qemu_detach_timeout,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "local_gb": self.disk_gb,
            "cpu_allocation_ratio": self.cpu_allocation_ratio,
            "ram_allocation_ratio": self.ram_allocation_ratio,
            "disk_allocation_ratio": self.disk_allocation_ratio,
            "hypervisor_hostname": self.hypervisor_hostname,
        }
        return {k: v for k, v in options.items() if v != ""}

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
            "failures_file": self.failures_file,
            "migration": self.migration,
            "fsync": self.fsync,
            "hypervisor_hostname": self.hypervisor_hostname,
        }
        return {k: v for k, v in options.items() if v != ""}


@dataclasses.dataclass(slots=True)
class LiveMigrationConfig:
    """Live migration (docs/live-migration.md): timeouts and limits of both services' parts.

    One section for the conductor's task and the agents' source and destination halves; each
    service reads its own options (the comment above each says who). Every long call to a peer
    carries call-monitor heartbeats: a peer silent ``call_monitor_timeout`` seconds is dead.
    """

    # Both: the heartbeat window of long calls (heartbeats every half of it, whole seconds, so
    # at least 2 s to get any).
    call_monitor_timeout: float = dataclasses.field(default=10.0, metadata=meta(at_least(2)))
    # Both: plain calls (abort, force-complete).
    rpc_timeout: float = dataclasses.field(default=30.0, metadata=meta(positive))
    # Conductor: destinations tried (each refusing host excluded) before the request fails.
    max_attempts: int = dataclasses.field(default=3, metadata=meta(at_least(1)))
    # Conductor: overall bound of one destination's prechecks (which ask the source in turn).
    precheck_timeout: float = dataclasses.field(default=120.0, metadata=meta(positive))
    # Conductor: overall bound of the whole migration (the source's call returns at its end).
    migration_timeout: float = dataclasses.field(default=6 * 3600.0, metadata=meta(positive))
    # Agent: overall bound of a long call to the peer agent (a slow but alive peer).
    long_call_timeout: float = dataclasses.field(default=6 * 3600.0, metadata=meta(positive))
    # Agent: asking a peer for its guest's phase in recovery (short: a start with a dead peer
    # is not held up; an unanswered question is asked again later).
    phase_query_timeout: float = dataclasses.field(default=5.0, metadata=meta(positive))
    # Agent: minimum seconds between two progress saves (the final report is always saved).
    progress_interval: float = dataclasses.field(default=0.5, metadata=meta(at_least(0)))
    # Agent: copies running at once with this host as source; the rest wait in "queued".
    max_concurrent: int = dataclasses.field(default=16, metadata=meta(at_least(1)))
    # Agent: migrations from this host accepted at once, beyond which the source precheck
    # refuses. Each holds an RPC handler slot for its whole duration: keep it well below
    # [messaging] max_concurrency.
    max_in_flight: int = dataclasses.field(default=32, metadata=meta(at_least(1)))
    # Agent: seconds between attempts to settle a migration whose peer did not answer.
    settle_retry_interval: float = dataclasses.field(default=5.0, metadata=meta(positive))
    # Agent: how long an abort/force-complete arriving at the very start of a copy keeps trying.
    control_grace: float = dataclasses.field(default=2.0, metadata=meta(at_least(0)))
    # Agent: a migration from this host still accepted/queued this long after its last change,
    # with no job here, lost its conductor: it is settled (ends "error").
    orphan_after: float = dataclasses.field(default=900.0, metadata=meta(positive))
    # Agent: seconds between two looks for such orphans.
    orphan_check_interval: float = dataclasses.field(default=60.0, metadata=meta(positive))


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
        default=("fleet-conductor", "fleet-conductor-*"), metadata=meta(check_login_patterns)
    )
    operator_logins: tuple[str, ...] = dataclasses.field(
        default=("fleet-operator", "fleet-operator-*"), metadata=meta(check_login_patterns)
    )
    host_login_prefix: str = dataclasses.field(
        default="fleet-host-", metadata=meta(check_login_prefix)
    )
    legacy_shared_login: str = ""
    legacy_hosts: tuple[str, ...] = dataclasses.field(default=(), metadata=meta(check_hosts))


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
        default="auto", metadata=meta(one_of("auto", "json", "console"))
    )
    level: str = dataclasses.field(
        default="info", metadata=meta(one_of("debug", "info", "warning", "error", "critical"))
    )
    # Log the name and version of every object this process receives ("object_received"): how
    # the upgrade tests prove, from an older agent's own log, that it got only what it knows.
    trace_object_versions: bool = False


@dataclasses.dataclass(slots=True)
class FleetConfig:
    """The whole effective configuration of one Fleet process."""

    host: str = dataclasses.field(default_factory=socket.gethostname, metadata=meta(check_host))
    messaging: MessagingConfig = dataclasses.field(default_factory=MessagingConfig)
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)
    upgrade_levels: UpgradeLevelsConfig = dataclasses.field(default_factory=UpgradeLevelsConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    conductor: ConductorConfig = dataclasses.field(default_factory=ConductorConfig)
    live_migration: LiveMigrationConfig = dataclasses.field(default_factory=LiveMigrationConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    notifications: NotificationsConfig = dataclasses.field(default_factory=NotificationsConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
