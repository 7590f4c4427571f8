"""The data a virt driver and the compute agent exchange: instance views, guest info, host capacity.

Instances are passed to the driver as objects (the Juno "virt-objects" direction), typed by small
protocols so the agent's oslo.versionedobjects ``Instance`` fits without the driver importing it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class HasUUID(Protocol):
    """Anything that names a guest: enough for operations that only need to find it."""

    @property
    def uuid(self) -> str: ...


@runtime_checkable
class InstanceLike(HasUUID, Protocol):
    """The instance attributes a driver reads (the project's ``Instance`` object has them all)."""

    @property
    def vcpus(self) -> int: ...

    @property
    def memory_mb(self) -> int: ...

    @property
    def root_gb(self) -> int: ...

    @property
    def host(self) -> str | None: ...

    @property
    def node(self) -> str | None: ...


@dataclass(frozen=True)
class GuestRef:
    """A bare guest reference, for recovery code that has a UUID but no Instance object."""

    uuid: str


@dataclass(frozen=True)
class GuestSpec:
    """A plain ``InstanceLike`` for tests, tools and recovery code."""

    uuid: str
    vcpus: int = 1
    memory_mb: int = 512
    root_gb: int = 1
    host: str | None = None
    node: str | None = None


class PowerState(enum.IntEnum):
    """Guest power state; the numbers are Nova's ``nova.compute.power_state`` values."""

    NOSTATE = 0
    RUNNING = 1
    PAUSED = 3
    SHUTDOWN = 4
    CRASHED = 6
    SUSPENDED = 7


class GuestPhase(enum.StrEnum):
    """Where a guest is in its life on one hypervisor (persisted by the fake driver).

    ``owns_guest`` below says which phases mean "this hypervisor runs, or is the home of, the
    guest"; INCOMING and MIGRATED_OUT are the two halves of a migration switch-over.
    """

    SPAWNING = "spawning"  # build in progress; not yet running
    RUNNING = "running"
    STOPPED = "stopped"  # powered off, still defined here
    ERROR = "error"  # a build interrupted by an agent crash: never ran, destroy it
    MIGRATING_OUT = "migrating_out"  # source: memory copy in progress, guest still runs here
    MIGRATED_OUT = "migrated_out"  # source: switched over; paused copy kept until cleanup
    INCOMING = "incoming"  # destination: paused, receiving, waits for post/rollback


#: Phases in which this hypervisor is the guest's home (exactly one host may be in one of these).
OWNER_PHASES: frozenset[GuestPhase] = frozenset(
    {
        GuestPhase.SPAWNING,
        GuestPhase.RUNNING,
        GuestPhase.STOPPED,
        GuestPhase.ERROR,
        GuestPhase.MIGRATING_OUT,
    }
)

#: The power state each phase reports.
PHASE_POWER: dict[GuestPhase, PowerState] = {
    GuestPhase.SPAWNING: PowerState.NOSTATE,
    GuestPhase.RUNNING: PowerState.RUNNING,
    GuestPhase.STOPPED: PowerState.SHUTDOWN,
    GuestPhase.ERROR: PowerState.NOSTATE,
    GuestPhase.MIGRATING_OUT: PowerState.RUNNING,
    GuestPhase.MIGRATED_OUT: PowerState.PAUSED,
    GuestPhase.INCOMING: PowerState.PAUSED,
}


@dataclass(frozen=True)
class InstanceInfo:
    """What the hypervisor knows about one guest (``get_info`` / ``list_guests``)."""

    uuid: str
    power_state: PowerState
    phase: GuestPhase
    vcpus: int
    memory_mb: int
    root_gb: int
    volumes: dict[str, str] = field(default_factory=dict)
    #: Peer host of a live migration this guest takes part in (source or destination side).
    migration_peer: str | None = None
    #: What an agent restart interrupted for this guest ("spawn", "live_migration_copy"), if any.
    interrupted: str | None = None

    @property
    def state(self) -> str:
        """A short state name for logs and CLIs (the phase's value)."""
        return self.phase.value

    @property
    def owns_guest(self) -> bool:
        """True when this hypervisor is the guest's home rather than one half of a switch-over."""
        return self.phase in OWNER_PHASES


@dataclass(frozen=True)
class HostResources:
    """Capacity and usage as the hypervisor itself sees them (every guest present counts)."""

    hypervisor_hostname: str
    vcpus: int
    memory_mb: int
    local_gb: int
    vcpus_used: int
    memory_mb_used: int
    local_gb_used: int
    running_vms: int
    hypervisor_type: str = "fake"
    hypervisor_version: int = 1

    @property
    def memory_mb_free(self) -> int:
        """Physical RAM not used by any guest."""
        return self.memory_mb - self.memory_mb_used

    @property
    def local_gb_free(self) -> int:
        """Local disk not used by any guest."""
        return self.local_gb - self.local_gb_used

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for migrate data or a ComputeNode update)."""
        return {
            "hypervisor_hostname": self.hypervisor_hostname,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "local_gb": self.local_gb,
            "vcpus_used": self.vcpus_used,
            "memory_mb_used": self.memory_mb_used,
            "local_gb_used": self.local_gb_used,
            "running_vms": self.running_vms,
            "hypervisor_type": self.hypervisor_type,
            "hypervisor_version": self.hypervisor_version,
        }


@dataclass(frozen=True)
class MigrationProgress:
    """One progress report of a live migration's memory copy (byte counts, like Nova's Migration).

    ``memory_processed`` is cumulative and may exceed ``memory_total`` (dirtied pages are sent
    again); ``memory_remaining`` is the dirty set still to send and can grow between rounds.
    ``percent`` is the high-water mark of ``100 * (1 - remaining / total)``: monotonic, for UIs.
    """

    memory_total: int
    memory_processed: int
    memory_remaining: int
    rounds: int
    percent: int
    forced: bool = False


@dataclass(frozen=True)
class MigrationResult:
    """What a successful ``live_migration`` reports once the switch-over happened."""

    rounds: int
    memory_total: int
    memory_processed: int
    #: Simulated time the guest was paused for the last copy (remaining / bandwidth).
    downtime_s: float
    #: Simulated duration of the copy.
    duration_s: float
    #: True if the guest was paused to converge (force_complete or the "force" policy).
    forced: bool
