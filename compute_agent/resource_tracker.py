"""The agent's ComputeNode: capacity from the hypervisor, usage from the claims it holds.

Usage reported to the conductor is always the sum of the instances claimed on this host; it is
recomputed from the instances the database places here at start (after a crash) and pushed
whenever claims change. Pushes are coalesced: many claims in a burst cost one ComputeNode save.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from compute_agent.claims import Capacity, ClaimTracker, Resources
from compute_agent.transient import TRANSIENT_ERRORS, short
from compute_agent.virt.driver import ComputeDriver
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import VMState
from shared_objects.objects.compute_node import ComputeNode
from shared_objects.objects.instance import Instance

log = structlog.get_logger(__name__)

# Instances in these states hold resources on their host.
CONSUMING_STATES = frozenset({VMState.BUILDING, VMState.ACTIVE, VMState.STOPPED, VMState.PAUSED})


def instance_resources(instance: Instance) -> Resources:
    return Resources(instance.vcpus, instance.memory_mb, instance.root_gb)


class ResourceTracker:
    """Claims on this host and the ComputeNode row that reports them."""

    def __init__(
        self,
        host: str,
        driver: ComputeDriver,
        *,
        cpu_allocation_ratio: float,
        ram_allocation_ratio: float,
        disk_allocation_ratio: float,
        flush_delay: float = 0.05,
    ) -> None:
        self.host = host
        self.driver = driver
        self.ratios = (cpu_allocation_ratio, ram_allocation_ratio, disk_allocation_ratio)
        self.flush_delay = flush_delay
        self.claims = ClaimTracker(Capacity(0, 0, 0))
        self.node: ComputeNode | None = None
        self._dirty = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._ctxt: RequestContext | None = None

    @property
    def nodename(self) -> str:
        return self.node.hypervisor_hostname if self.node is not None else self.host

    async def start(self, ctxt: RequestContext, instances: list[Instance]) -> None:
        """Create or refresh the ComputeNode and recompute usage from ``instances``."""
        self._ctxt = ctxt
        res = await self.driver.get_available_resource()
        cpu, ram, disk = self.ratios
        self.claims = ClaimTracker(Capacity(res.vcpus, res.memory_mb, res.local_gb, cpu, ram, disk))
        self.claims.reset(
            (i.uuid, instance_resources(i)) for i in instances if i.vm_state in CONSUMING_STATES
        )
        try:
            node = await ComputeNode.get_by_host_and_nodename(
                ctxt, self.host, res.hypervisor_hostname
            )
        except exception.ComputeHostNotFound:
            node = ComputeNode(ctxt, host=self.host, hypervisor_hostname=res.hypervisor_hostname)
            self._fill(node, res.vcpus, res.memory_mb, res.local_gb)
            await node.create()
            log.info("compute_node_created", host=self.host, node=res.hypervisor_hostname)
        else:
            self._fill(node, res.vcpus, res.memory_mb, res.local_gb)
            await node.save()
        self.node = node
        self._flusher = asyncio.create_task(self._flush_loop(), name="resource-tracker-flush")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()

    def _fill(self, node: ComputeNode, vcpus: int, memory_mb: int, local_gb: int) -> None:
        used = self.claims.usage
        cpu, ram, disk = self.ratios
        values: dict[str, Any] = {
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "local_gb": local_gb,
            "vcpus_used": used.vcpus,
            "memory_mb_used": used.memory_mb,
            "local_gb_used": used.disk_gb,
            "running_vms": len(self.claims.claimed_uuids),
            "cpu_allocation_ratio": cpu,
            "ram_allocation_ratio": ram,
            "disk_allocation_ratio": disk,
        }
        for key, value in values.items():
            # Only changed fields travel to the conductor.
            if not node.obj_attr_is_set(key) or getattr(node, key) != value:
                setattr(node, key, value)

    async def claim(self, instance: Instance) -> None:
        """Claim the instance's resources here (``InsufficientResources`` when they don't fit)."""
        await self.claims.claim(instance.uuid, instance_resources(instance))
        self._dirty.set()

    def release(self, uuid: str) -> None:
        if self.claims.release(uuid):
            self._dirty.set()

    def holds(self, uuid: str) -> bool:
        return self.claims.holds(uuid)

    async def flush(self) -> None:
        """Push the current usage to the ComputeNode now (no-op when unchanged)."""
        node = self.node
        if node is None:
            return
        self._dirty.clear()
        self._fill(node, node.vcpus, node.memory_mb, node.local_gb)
        if node.obj_what_changed():
            await node.save()

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.flush_delay)
            try:
                await self.flush()
            except TRANSIENT_ERRORS as exc:
                # An outage (database, broker): expected, one short line; pushed again below.
                log.warning("compute_node_update_failed", host=self.host, error=short(exc))
                self._dirty.set()
                await asyncio.sleep(1.0)
            except Exception:
                # Anything else: the next change or the periodic refresh pushes again.
                # Logged with the traceback, never swallowed silently.
                log.exception("compute_node_update_failed", host=self.host)
                self._dirty.set()
                await asyncio.sleep(1.0)
