"""Resource claims on one host: never over-commit, usage is always the sum of the claims.

A claim is taken before a guest is spawned (or prepared for an incoming live migration) and
released when the guest goes away or the operation fails. Claims are checked and recorded under
one lock, so concurrent builds cannot both see the same free capacity.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable

from shared_objects.exception import InsufficientResources


@dataclasses.dataclass(frozen=True, slots=True)
class Resources:
    """Resources one instance uses."""

    vcpus: int = 0
    memory_mb: int = 0
    disk_gb: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus + other.vcpus,
            self.memory_mb + other.memory_mb,
            self.disk_gb + other.disk_gb,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """What a host offers, and how far each resource may be over-committed."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.5
    disk_allocation_ratio: float = 1.0

    @property
    def limits(self) -> tuple[float, float, float]:
        return (
            self.vcpus * self.cpu_allocation_ratio,
            self.memory_mb * self.ram_allocation_ratio,
            self.disk_gb * self.disk_allocation_ratio,
        )


class ClaimTracker:
    """The claims held on one host, keyed by instance uuid."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._claims: dict[str, Resources] = {}
        self._lock = asyncio.Lock()

    @property
    def usage(self) -> Resources:
        total = Resources()
        for res in self._claims.values():
            total = total + res
        return total

    @property
    def claimed_uuids(self) -> frozenset[str]:
        return frozenset(self._claims)

    def holds(self, uuid: str) -> bool:
        return uuid in self._claims

    async def claim(self, uuid: str, res: Resources) -> None:
        """Record a claim for ``uuid`` or raise ``InsufficientResources`` (the shared error, so
        a refused claim in ``pre_live_migration`` reaches the source as itself); idempotent
        per uuid."""
        async with self._lock:
            if uuid in self._claims:
                return
            used = self.usage + res
            max_vcpus, max_ram, max_disk = self.capacity.limits
            short = []
            if used.vcpus > max_vcpus:
                short.append(f"vCPU {used.vcpus} > {max_vcpus:g}")
            if used.memory_mb > max_ram:
                short.append(f"RAM {used.memory_mb} MB > {max_ram:g} MB")
            if used.disk_gb > max_disk:
                short.append(f"disk {used.disk_gb} GB > {max_disk:g} GB")
            if short:
                raise InsufficientResources("claim refused: " + ", ".join(short))
            self._claims[uuid] = res

    def release(self, uuid: str) -> bool:
        """Drop the claim for ``uuid``; returns whether one was held."""
        return self._claims.pop(uuid, None) is not None

    def reset(self, claims: Iterable[tuple[str, Resources]]) -> None:
        """Replace every claim, e.g. when recomputing usage from the instances on the host."""
        self._claims = dict(claims)
