"""Fleet-wide invariants, checked after tests (in-process fleets and real clusters alike).

    violations = await check_fleet_invariants(ctxt, await driver_views(drivers))
    assert not violations, violations
    # or: await assert_fleet_invariants(ctxt, await hypervisor_view(state_dir))

What must hold whenever no operation is in flight:

1. every non-deleted ACTIVE instance runs on exactly one hypervisor (an owner phase: running,
   stopped, ...), and that host is the instance's ``host`` in the database;
2. no hypervisor keeps anything else: no paused migration copy (incoming / migrated_out) and no
   guest for an instance the database does not place there;
3. every ComputeNode's usage (vCPU, RAM, disk) equals the sum of the instances placed on its
   host that hold resources (building, active, stopped, paused);
4. no instance has a ``task_state`` left set;
5. optionally, each agent's claims are exactly the instances placed on its host.

``ctxt`` is any context remotable calls work with: a conductor-side one (``database.request``)
or an operator/agent one with an indirection API installed. Shipped in the package so every
team's tests (and ``make demo``) can run the same checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.models import InstanceInfo
from shared_objects.fields import VMState
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.instance import InstanceList

#: ``{host: {instance uuid: InstanceInfo}}``, as ``virt.state_view.hypervisor_view`` returns.
HypervisorView = Mapping[str, Mapping[str, InstanceInfo]]

CONSUMING = frozenset({VMState.BUILDING, VMState.ACTIVE, VMState.STOPPED, VMState.PAUSED})


class InvariantViolation(AssertionError):
    """The fleet broke at least one invariant; ``violations`` lists each one."""

    def __init__(self, violations: list[str]) -> None:
        self.violations = violations
        super().__init__("fleet invariants violated:\n  " + "\n  ".join(violations))


async def driver_views(drivers: Mapping[str, ComputeDriver]) -> dict[str, dict[str, InstanceInfo]]:
    """The hypervisor view of in-process drivers, keyed by host."""
    return {host: {g.uuid: g for g in await d.list_guests()} for host, d in drivers.items()}


async def check_fleet_invariants(
    ctxt: Any,
    hypervisors: HypervisorView,
    *,
    claims: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """Every violation found, as readable lines (empty: all invariants hold)."""
    problems: list[str] = []
    instances = {i.uuid: i for i in await InstanceList.get_all(ctxt)}
    placed: dict[str, set[str]] = {}
    for inst in instances.values():
        if inst.task_state is not None:
            problems.append(f"instance {inst.uuid}: task_state {inst.task_state!r} left set")
        if inst.host is not None and inst.vm_state in CONSUMING:
            placed.setdefault(inst.host, set()).add(inst.uuid)
        if inst.vm_state != VMState.ACTIVE:
            continue
        homes = sorted(h for h, guests in hypervisors.items() if _owns(guests.get(inst.uuid)))
        if len(homes) != 1:
            problems.append(f"instance {inst.uuid}: runs on {len(homes)} hypervisors {homes}")
        elif homes[0] != inst.host:
            problems.append(
                f"instance {inst.uuid}: database says host {inst.host}, hypervisor {homes[0]}"
            )
    for host, guests in hypervisors.items():
        for uuid, info in guests.items():
            inst = instances.get(uuid)
            if inst is None:
                problems.append(f"{host}: guest {uuid} ({info.phase.value}) has no instance")
            elif inst.host != host:
                problems.append(
                    f"{host}: guest {uuid} ({info.phase.value}) but the instance is on {inst.host}"
                )
            elif not info.owns_guest:
                problems.append(f"{host}: guest {uuid} left in phase {info.phase.value}")
    for node in await ComputeNodeList.get_all(ctxt):
        mine = [instances[u] for u in placed.get(node.host, set())]
        want = (
            sum(i.vcpus for i in mine),
            sum(i.memory_mb for i in mine),
            sum(i.root_gb for i in mine),
        )
        have = (node.vcpus_used, node.memory_mb_used, node.local_gb_used)
        if have != want:
            problems.append(
                f"compute node {node.host}: usage (vcpus, MB, GB) {have} != instances {want}"
            )
    for host, held in (claims or {}).items():
        held_set, want_set = set(held), placed.get(host, set())
        if held_set != want_set:
            problems.append(
                f"{host}: claims for {sorted(held_set - want_set)} without instances, "
                f"instances {sorted(want_set - held_set)} without claims"
            )
    return problems


async def assert_fleet_invariants(
    ctxt: Any,
    hypervisors: HypervisorView,
    *,
    claims: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """Raise ``InvariantViolation`` listing every broken invariant."""
    problems = await check_fleet_invariants(ctxt, hypervisors, claims=claims)
    if problems:
        raise InvariantViolation(problems)


def _owns(info: InstanceInfo | None) -> bool:
    return info is not None and info.owns_guest
