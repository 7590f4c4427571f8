"""What a conductor adds to the host view: its own recent placements.

The view itself is ``conductor.host_view.HostView`` (cached, refreshed by deltas);
``load_host_states`` is the uncached read it replaced (every ComputeNode and Service row per
call), kept as the baseline ``bench/scheduler.py`` measures against.

A ComputeNode's usage lags behind the placements a conductor has just made: the agent reports
it only after it claimed. ``PlacementLedger`` remembers this conductor's recent placements and
adds those a host has not reported yet, so a burst of single-instance requests spreads instead
of piling onto the host that looked emptiest a moment ago. The agent's claim stays the
authority: an estimate that is off costs a reschedule, never an over-commit.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from conductor.host_view import FleetView
from conductor.scheduler import HostState, ResourceRequest
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.service import ServiceList
from shared_objects.releases import BINARY_COMPUTE


@dataclasses.dataclass(slots=True)
class _Placement:
    host: str
    req: ResourceRequest
    at: datetime.datetime


class PlacementLedger:
    """This conductor's placements not yet visible in the hosts' reported usage."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = datetime.timedelta(seconds=ttl)
        self._placements: dict[str, _Placement] = {}

    def record(self, host: str, req: ResourceRequest) -> None:
        self._placements[uuid.uuid4().hex] = _Placement(host, req, _utcnow())

    def apply(
        self,
        states: list[HostState],
        reported_at: Mapping[str, datetime.datetime],
        positions: Mapping[str, Sequence[int]] | None = None,
    ) -> list[HostState]:
        """``states`` with what each host has not reported since the placement was made added
        to its usage. The states given are not changed (they may be the host view's, shared):
        a host with pending placements is copied, the others are passed through. ``positions``
        (where each host's states are in ``states``) saves a pass over all of them.

        Call it, select, and ``record`` the choices without awaiting in between, so concurrent
        requests in this process each see the others' placements.
        """
        now = _utcnow()
        pending: dict[str, list[ResourceRequest]] = {}
        for key, placement in list(self._placements.items()):
            seen = reported_at.get(placement.host)
            if now - placement.at > self.ttl or (seen is not None and seen > placement.at):
                del self._placements[key]
                continue
            pending.setdefault(placement.host, []).append(placement.req)
        if not pending:
            return states
        if positions is None:
            found: dict[str, list[int]] = {}
            for i, state in enumerate(states):
                if state.host in pending:
                    found.setdefault(state.host, []).append(i)
            positions = found
        out = list(states)
        for host, reqs in pending.items():
            for i in positions.get(host, ()):
                state = dataclasses.replace(out[i])
                for req in reqs:
                    state.consume(req)
                out[i] = state
        return out


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def load_host_states(ctxt: Any, service_down_time: float) -> FleetView:
    """One HostState per compute node whose host runs a registered compute service, read in
    full (two queries, every row as an object): the uncached baseline of ``HostView``."""
    nodes = await ComputeNodeList.get_all(ctxt)
    services = {s.host: s for s in await ServiceList.get_by_binary(ctxt, BINARY_COMPUTE)}
    now = _utcnow()
    states: list[HostState] = []
    reported_at: dict[str, datetime.datetime] = {}
    for node in nodes:
        service = services.get(node.host)
        if service is None:
            continue
        states.append(
            HostState(
                host=node.host,
                node=node.hypervisor_hostname,
                vcpus=node.vcpus,
                memory_mb=node.memory_mb,
                local_gb=node.local_gb,
                vcpus_used=node.vcpus_used,
                memory_mb_used=node.memory_mb_used,
                local_gb_used=node.local_gb_used,
                cpu_allocation_ratio=node.cpu_allocation_ratio,
                ram_allocation_ratio=node.ram_allocation_ratio,
                disk_allocation_ratio=node.disk_allocation_ratio,
                service_up=service.is_up_at(now, service_down_time),
                service_disabled=service.disabled,
            )
        )
        stamp = node.updated_at if node.obj_attr_is_set("updated_at") else None
        if stamp is not None:
            reported_at[node.host] = stamp
    return FleetView(states, reported_at)
