"""The scheduler's view of the fleet, read from ComputeNode and Service rows in two queries."""

from __future__ import annotations

import datetime
from typing import Any

from conductor.scheduler import HostState
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.service import ServiceList
from shared_objects.releases import BINARY_COMPUTE


async def load_host_states(ctxt: Any, service_down_time: float) -> list[HostState]:
    """One HostState per compute node whose host runs a registered compute service."""
    nodes = await ComputeNodeList.get_all(ctxt)
    services = {s.host: s for s in await ServiceList.get_by_binary(ctxt, BINARY_COMPUTE)}
    now = datetime.datetime.now(datetime.UTC)
    states: list[HostState] = []
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
    return states
