"""What a host can still take: the checks every driver makes before it places a guest, and the
capacity and usage it reports."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from compute_agent.virt.exceptions import InsufficientResources, VolumeAlreadyAttached
from compute_agent.virt.models import GuestPhase, HostResources


def check_capacity(host: str, cfg: Any, guests: Iterable[Any], instance: Any) -> None:
    """Refuse ``instance`` when the guests already here plus it exceed a resource's limit
    (capacity times allocation ratio of the driver's config)."""
    guests = list(guests)
    checks = (
        ("vcpus", instance.vcpus, cfg.vcpus * cfg.cpu_allocation_ratio, "vcpus"),
        ("memory_mb", instance.memory_mb, cfg.memory_mb * cfg.ram_allocation_ratio, "memory_mb"),
        ("local_gb", instance.root_gb, cfg.local_gb * cfg.disk_allocation_ratio, "root_gb"),
    )
    for resource, requested, limit, attr in checks:
        used = sum(getattr(g, attr) for g in guests)
        if used + requested > limit:
            raise InsufficientResources(
                resource=resource,
                host=host,
                uuid=instance.uuid,
                requested=requested,
                free=int(limit - used),
            )


def check_volumes_free(guests: Iterable[Any], uuid: str, volumes: Mapping[str, str]) -> None:
    """Refuse volumes attached to another guest, or mountpoints this guest already uses."""
    guests = list(guests)
    for volume_id, mountpoint in volumes.items():
        for other in guests:
            if volume_id in other.volumes or (
                other.uuid == uuid and mountpoint in other.volumes.values()
            ):
                raise VolumeAlreadyAttached(uuid=uuid, volume_id=volume_id, mountpoint=mountpoint)


def host_resources(
    host: str,
    cfg: Any,
    guests: Iterable[Any],
    running_phases: Collection[GuestPhase],
    hypervisor_type: str,
) -> HostResources:
    """Capacity (the driver's config) and usage (every guest present) of a host; guests in
    ``running_phases`` count as running VMs."""
    guests = list(guests)
    return HostResources(
        hypervisor_hostname=cfg.hypervisor_hostname or host,
        vcpus=cfg.vcpus,
        memory_mb=cfg.memory_mb,
        local_gb=cfg.local_gb,
        vcpus_used=sum(g.vcpus for g in guests),
        memory_mb_used=sum(g.memory_mb for g in guests),
        local_gb_used=sum(g.root_gb for g in guests),
        running_vms=sum(1 for g in guests if g.phase in running_phases),
        hypervisor_type=hypervisor_type,
    )
