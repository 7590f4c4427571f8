"""The virt layer: the hypervisor interface the compute agent drives, and a fake hypervisor.

Import from here: ``from compute_agent.virt import ComputeDriver, FakeDriver, FakeDriverConfig``.
docs/virt.md describes the contract, the live-migration model, failure injection and recovery.
"""

from compute_agent.virt.driver import BlockDeviceInfo, ComputeDriver, ProgressCallback
from compute_agent.virt.exceptions import (
    InjectedFailure,
    InstanceExists,
    InstanceNotFound,
    InsufficientResources,
    InvalidFirewallRule,
    InvalidGuestState,
    MigrationAborted,
    MigrationError,
    MigrationNotConverging,
    MigrationPreCheckError,
    NoActiveMigration,
    NotSupported,
    StateFileError,
    VirtError,
    VolumeAlreadyAttached,
    VolumeError,
    VolumeNotAttached,
)
from compute_agent.virt.failures import STEPS, FailureInjector, FailureRule, parse_failure_spec
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from compute_agent.virt.firewall import FirewallRule, normalize_rule, normalize_rules
from compute_agent.virt.loader import DRIVERS, create_driver
from compute_agent.virt.migration_model import CopyState, MigrationModel, NonConvergencePolicy
from compute_agent.virt.models import (
    OWNER_PHASES,
    GuestPhase,
    GuestRef,
    GuestSpec,
    HasUUID,
    HostResources,
    InstanceInfo,
    InstanceLike,
    MigrationProgress,
    MigrationResult,
    PowerState,
)
from compute_agent.virt.recovery import Outcome, Resolution, resolve_migration
from compute_agent.virt.state_view import guest_homes, hypervisor_view

__all__ = [
    "DRIVERS",
    "OWNER_PHASES",
    "STEPS",
    "BlockDeviceInfo",
    "ComputeDriver",
    "CopyState",
    "FailureInjector",
    "FailureRule",
    "FakeDriver",
    "FakeDriverConfig",
    "FirewallRule",
    "GuestPhase",
    "GuestRef",
    "GuestSpec",
    "HasUUID",
    "HostResources",
    "InjectedFailure",
    "InstanceExists",
    "InstanceInfo",
    "InstanceLike",
    "InstanceNotFound",
    "InsufficientResources",
    "InvalidFirewallRule",
    "InvalidGuestState",
    "MigrationAborted",
    "MigrationError",
    "MigrationModel",
    "MigrationNotConverging",
    "MigrationPreCheckError",
    "MigrationProgress",
    "MigrationResult",
    "NoActiveMigration",
    "NonConvergencePolicy",
    "NotSupported",
    "Outcome",
    "PowerState",
    "ProgressCallback",
    "Resolution",
    "StateFileError",
    "VirtError",
    "VolumeAlreadyAttached",
    "VolumeError",
    "VolumeNotAttached",
    "create_driver",
    "guest_homes",
    "hypervisor_view",
    "normalize_rule",
    "normalize_rules",
    "parse_failure_spec",
    "resolve_migration",
]
