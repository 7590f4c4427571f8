"""The policy table covers everything that can be called, and nothing else.

A new remotable or RPC method without a policy entry must fail here (and the RPC servers refuse
to start with an uncovered method), so nothing ever ships callable by a role nobody decided on.
"""

from __future__ import annotations

from compute_agent.endpoint import ComputeEndpoint
from conductor.indirection import BaseAPIEndpoint, ConductorIndirectionEndpoint, remotable_methods
from conductor.liveness import LivenessEndpoint
from conductor.tasks.endpoint import ComputeTaskEndpoint
from shared_objects.base import FleetObjectRegistry
from shared_objects.policy import (
    COMPUTE_RPC_POLICY,
    CONDUCTOR_RPC_POLICY,
    OBJECT_POLICY,
    Access,
)
from shared_objects.runtime.identity import Identities, Role
from shared_objects.runtime.messaging.dispatcher import Dispatcher


def _remotables() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for name, classes in FleetObjectRegistry.fleet_classes().items():
        for cls in classes:
            found |= {(name, method) for method in remotable_methods(cls)}
    return found


def test_every_remotable_has_exactly_one_policy_entry() -> None:
    remotables = _remotables()
    assert remotables - set(OBJECT_POLICY) == set(), "remotables without a policy entry"
    assert set(OBJECT_POLICY) - remotables == set(), "policy entries for no remotable"


def _exposed(*endpoint_classes: type) -> set[tuple[str | None, str]]:
    out: set[tuple[str | None, str]] = set()
    for cls in endpoint_classes:
        endpoint = cls.__new__(cls)  # only the class's exposed methods are looked at
        dispatcher = Dispatcher([endpoint])
        out |= {(e.namespace, name) for e in dispatcher.endpoints for name in e.methods}
    return out


def test_every_conductor_rpc_method_has_a_policy_entry() -> None:
    exposed = _exposed(
        ConductorIndirectionEndpoint, LivenessEndpoint, BaseAPIEndpoint, ComputeTaskEndpoint
    )
    assert exposed == set(CONDUCTOR_RPC_POLICY)


def test_only_agents_may_report_alive() -> None:
    assert CONDUCTOR_RPC_POLICY[(None, "report_alive")] == frozenset({Role.AGENT})


def test_every_compute_rpc_method_has_a_policy_entry() -> None:
    assert _exposed(ComputeEndpoint) == set(COMPUTE_RPC_POLICY)


def test_agents_change_no_fleet_catalogue_and_start_no_flow() -> None:
    # Flavors, security groups, builds and migrations are started or changed by operators.
    for key in [
        ("Flavor", "create"),
        ("Flavor", "save"),
        ("Flavor", "destroy"),
        ("SecurityGroup", "create"),
        ("SecurityGroupRule", "create"),
        ("SecurityGroupRule", "destroy"),
        ("Instance", "create"),
        ("Migration", "create"),
    ]:
        assert OBJECT_POLICY[key].agent is Access.DENY, key
    operators_only = {
        method
        for (ns, method), roles in CONDUCTOR_RPC_POLICY.items()
        if ns == "compute_task" and Role.AGENT not in roles
    }
    assert {"build_instances", "delete_instance", "lock_instance", "unlock_instance"} <= (
        operators_only
    )
    assert {"live_migrate_instance", "security_group_create"} <= operators_only


def test_agents_serve_compute_rpc_to_conductors_and_migration_peers_only() -> None:
    for (_, method), roles in COMPUTE_RPC_POLICY.items():
        assert Role.OPERATOR not in roles and Role.UNKNOWN not in roles, method
    assert Role.AGENT not in COMPUTE_RPC_POLICY[(None, "terminate_instance")]
    assert Role.AGENT not in COMPUTE_RPC_POLICY[(None, "run_instance")]


def test_login_naming_rule_and_roles() -> None:
    ids = Identities()
    assert ids.login_for_host("compute-1") == "fleet-host-compute-1"
    assert ids.resolve("fleet-host-compute-1").hosts == frozenset({"compute-1"})
    assert ids.resolve("fleet-conductor-2").role is Role.CONDUCTOR
    assert ids.resolve("fleet-operator").role is Role.OPERATOR
    for nobody in ("guest", "", None, "fleet-host-", "admin"):
        assert ids.resolve(nobody).role is Role.UNKNOWN
