"""The policy table: who may call every RPC method and every remotable object method.

One file, data only, read by ``docs/security.md``. Roles come from the broker-validated login
(``shared_objects.runtime.identity``), never from the message body. Enforcement lives elsewhere:

* ``shared_objects.runtime.authorizer.RoleAuthorizer`` checks the RPC tables below for every request
  a server receives, before its arguments are even decoded;
* the conductor's indirection endpoint checks ``OBJECT_POLICY`` for every object call, and for an
  agent runs the method under the caller's ownership scope, which the database layer turns into
  conditions inside the statements themselves (``conductor/db/ownership/``);
* agents check the live-migration peer rule against the Migration row
  (``compute_agent/peer_auth.py``).

Conductors and operators may call every object method (they are the fleet's administrators);
the table says what an *agent* may do. Anything not listed here cannot be called by anyone: the
servers refuse to start with an RPC method that has no entry, and a remotable without an entry is
refused for agents.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType

from shared_objects.runtime.identity import Role


class Access(enum.StrEnum):
    """What an agent may do with one object method."""

    #: Agents may not call it at all (operators' and conductors' business).
    DENY = "deny"
    #: Any agent may call it: fleet-wide facts an agent needs (flavors, service versions).
    ANY = "any"
    #: Runs under the caller's ownership scope: only rows of its host, its instances and the
    #: migrations it takes part in are read or written (conductor/db/ownership/).
    OWN = "own"


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectRule:
    """An agent's access to one remotable, whether it writes (audited when accepted), and the
    argument that must name the caller's own host (checked before anything runs)."""

    agent: Access
    writes: bool = False
    host_arg: str | None = None


_R = ObjectRule(Access.OWN)
_W = ObjectRule(Access.OWN, writes=True)
_ANY = ObjectRule(Access.ANY)
_NO_READ = ObjectRule(Access.DENY)
_NO_WRITE = ObjectRule(Access.DENY, writes=True)


def _own_host(arg: str = "host", *, writes: bool = False) -> ObjectRule:
    return ObjectRule(Access.OWN, writes=writes, host_arg=arg)


# (object, method) -> what an agent may do. Conductors and operators: everything.
OBJECT_POLICY: Mapping[tuple[str, str], ObjectRule] = MappingProxyType(
    {
        # Instances: its own (host, or an active live migration to or from it).
        ("Instance", "get_by_uuid"): _R,
        ("Instance", "create"): _NO_WRITE,  # builds are the conductor's
        ("Instance", "save"): _W,  # owner, lock and host changes refused inside the UPDATE
        ("Instance", "destroy"): _W,
        ("InstanceList", "get_by_host"): _own_host(),
        ("InstanceList", "get_by_host_and_node"): _own_host(),
        ("InstanceList", "get_by_uuids"): _R,
        ("InstanceList", "get_all"): _NO_READ,
        ("InstanceList", "get_by_security_group"): _NO_READ,
        # What hangs off its instances.
        ("BlockDeviceMapping", "get_by_volume_and_instance"): _R,
        ("BlockDeviceMapping", "create"): _W,
        ("BlockDeviceMapping", "save"): _W,
        ("BlockDeviceMapping", "destroy"): _W,
        ("BlockDeviceMappingList", "get_by_instance_uuid"): _R,
        ("InstanceAction", "get_by_request_id"): _R,
        ("InstanceAction", "action_start"): _W,
        ("InstanceAction", "action_finish"): _W,
        ("InstanceAction", "finish"): _W,
        ("InstanceActionEvent", "event_start"): _W,
        ("InstanceActionEvent", "event_finish"): _W,
        ("InstanceFault", "get_latest_for_instance"): _R,
        ("InstanceFault", "create"): _W,
        # An instance's whole history: operators' business (fleetctl action list|show).
        ("InstanceActionList", "get_by_instance_uuid"): _NO_READ,
        ("InstanceActionEventList", "get_by_action_id"): _NO_READ,
        ("InstanceFaultList", "get_by_instance_uuid"): _NO_READ,
        # Migrations it is the source or the destination of.
        ("Migration", "get_by_id"): _R,
        ("Migration", "get_by_uuid"): _R,
        ("Migration", "create"): _NO_WRITE,  # live migrations are requested by operators
        ("Migration", "save"): _W,
        ("MigrationList", "get_by_instance"): _R,
        ("MigrationList", "get_in_progress_by_host"): _own_host(),
        # Its own compute node.
        ("ComputeNode", "get_by_id"): _R,
        ("ComputeNode", "get_by_host_and_nodename"): _own_host(),
        ("ComputeNode", "create"): _W,  # the row's host must be the caller's (checked on insert)
        ("ComputeNode", "save"): _W,
        ("ComputeNode", "destroy"): _NO_WRITE,
        ("ComputeNodeList", "get_all"): _NO_READ,
        ("ComputeNodeList", "get_all_by_host"): _own_host(),
        # Its own service row; every service's version (version negotiation needs them).
        ("Service", "get_by_id"): _ANY,
        ("Service", "get_by_host_and_binary"): _ANY,
        ("Service", "get_minimum_version"): _ANY,
        ("Service", "register"): _own_host(writes=True),  # + binary and version floor
        ("Service", "create"): _NO_WRITE,
        ("Service", "save"): _W,
        ("Service", "heartbeat"): _W,
        ("Service", "destroy"): _NO_WRITE,
        ("ServiceList", "get_by_binary"): _ANY,
        ("ServiceList", "get_all"): _ANY,
        # The fleet's catalogue: readable, changed by operators only.
        ("Flavor", "get_by_id"): _ANY,
        ("Flavor", "get_by_flavor_id"): _ANY,
        ("Flavor", "get_by_name"): _ANY,
        ("Flavor", "create"): _NO_WRITE,
        ("Flavor", "save"): _NO_WRITE,
        ("Flavor", "destroy"): _NO_WRITE,
        ("FlavorList", "get_all"): _ANY,
        # Security groups: the rules of its own instances (read under the scope).
        ("SecurityGroup", "get_by_id"): _R,
        ("SecurityGroup", "get_by_name"): _NO_READ,
        ("SecurityGroup", "create"): _NO_WRITE,
        ("SecurityGroup", "save"): _NO_WRITE,
        ("SecurityGroup", "destroy"): _NO_WRITE,
        ("SecurityGroupList", "get_by_project"): _NO_READ,
        ("SecurityGroupList", "get_by_instance"): _R,
        ("SecurityGroupRule", "get_by_id"): _R,
        ("SecurityGroupRule", "create"): _NO_WRITE,
        ("SecurityGroupRule", "destroy"): _NO_WRITE,
        ("SecurityGroupRuleList", "get_by_security_group_ids"): _R,
        ("SecurityGroupRuleList", "get_by_instance"): _R,
    }
)

_ALL = frozenset({Role.CONDUCTOR, Role.OPERATOR, Role.AGENT})
_OPERATORS = frozenset({Role.CONDUCTOR, Role.OPERATOR})

# RPC methods served by conductors: (namespace, method) -> roles that may call them.
CONDUCTOR_RPC_POLICY: Mapping[tuple[str | None, str], frozenset[Role]] = MappingProxyType(
    {
        # Object indirection: every role; OBJECT_POLICY decides per object method.
        (None, "object_class_action_versions"): _ALL,
        (None, "object_action"): _ALL,
        (None, "object_backport_versions"): _ALL,
        ("baseapi", "ping"): _ALL,
        # Liveness: the caller's own host only (taken from its login, nothing is sent).
        (None, "report_alive"): frozenset({Role.AGENT}),
        # The compute-task API: operators' requests. An agent may only hand back a build that
        # failed on it (the handler checks the instance is assigned to the caller).
        ("compute_task", "reschedule_instance"): _ALL,
        ("compute_task", "build_instances"): _OPERATORS,
        ("compute_task", "delete_instance"): _OPERATORS,
        ("compute_task", "attach_volume"): _OPERATORS,
        ("compute_task", "detach_volume"): _OPERATORS,
        ("compute_task", "lock_instance"): _OPERATORS,
        ("compute_task", "unlock_instance"): _OPERATORS,
        ("compute_task", "live_migrate_instance"): _OPERATORS,
        ("compute_task", "live_migration_abort"): _OPERATORS,
        ("compute_task", "live_migration_force_complete"): _OPERATORS,
        ("compute_task", "get_migration"): _OPERATORS,
        ("compute_task", "list_migrations"): _OPERATORS,
        ("compute_task", "security_group_create"): _OPERATORS,
        ("compute_task", "security_group_list"): _OPERATORS,
        ("compute_task", "security_group_rule_add"): _OPERATORS,
        ("compute_task", "security_group_rule_delete"): _OPERATORS,
    }
)

_CONDUCTORS = frozenset({Role.CONDUCTOR})
# Conductors, and the agent on the other side of a live migration of the instance: the handler
# checks the Migration row names the caller (compute_agent/peer_auth.py).
_PEERS = frozenset({Role.CONDUCTOR, Role.AGENT})

# RPC methods served by compute agents: (namespace, method) -> roles that may call them.
COMPUTE_RPC_POLICY: Mapping[tuple[str | None, str], frozenset[Role]] = MappingProxyType(
    {
        (None, "run_instance"): _CONDUCTORS,
        (None, "terminate_instance"): _CONDUCTORS,
        (None, "attach_volume"): _CONDUCTORS,
        (None, "detach_volume"): _CONDUCTORS,
        (None, "refresh_instance_security_rules"): _CONDUCTORS,
        (None, "check_can_live_migrate_destination"): _CONDUCTORS,
        (None, "check_can_live_migrate_source"): _PEERS,
        (None, "live_migration"): _CONDUCTORS,
        (None, "pre_live_migration"): _PEERS,
        (None, "post_live_migration_at_destination"): _PEERS,
        (None, "rollback_live_migration_at_destination"): _PEERS,
        (None, "live_migration_abort"): _CONDUCTORS,
        (None, "live_migration_force_complete"): _CONDUCTORS,
        (None, "get_live_migration_guest"): _PEERS,
        (None, "settle_live_migration_peer"): _PEERS,
    }
)
