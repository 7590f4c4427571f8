"""The migrate data every driver builds and reads: the destination's and the source's prechecks
and fields, the incoming side's view of them, and the operator's bandwidth cap.

Driver-agnostic: a driver adds only its own keys (the QEMU driver's migration URI and root
ports) and makes its own further checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compute_agent.virt._guest import GuestBase
from compute_agent.virt.exceptions import InstanceExists, MigrationPreCheckError
from compute_agent.virt.models import GuestPhase, HostResources


def check_destination(host: str, uuid: str, source_host: str | None, existing: Any) -> None:
    """Refuse to take a guest from this very host, or one this host already holds
    (``existing``: its record here, or None)."""
    if source_host == host:
        raise MigrationPreCheckError(uuid=uuid, reason=f"destination {host} is the source")
    if existing is not None:
        raise MigrationPreCheckError(
            uuid=uuid, reason=f"guest already on {host} ({existing.phase.value})"
        )


def destination_data(
    host: str, source_host: str | None, resources: HostResources
) -> dict[str, Any]:
    """The destination's answer to the precheck (the start of the migrate data)."""
    return {
        "dest_host": host,
        "dest_hypervisor_hostname": resources.hypervisor_hostname,
        "dest_memory_mb_free": resources.memory_mb_free,
        "dest_local_gb_free": resources.local_gb_free,
        "source_host": source_host,
    }


def check_source(host: str, guest: GuestBase, dest_check_data: Mapping[str, Any]) -> None:
    """Refuse to migrate a guest that is not running, or to this very host."""
    if guest.phase is not GuestPhase.RUNNING:
        raise MigrationPreCheckError(
            uuid=guest.uuid, reason=f"guest is {guest.phase.value}, not running"
        )
    if dest_check_data.get("dest_host") == host:
        raise MigrationPreCheckError(uuid=guest.uuid, reason="destination is this host")


def source_data(host: str, guest: GuestBase, dest_check_data: Mapping[str, Any]) -> dict[str, Any]:
    """The migrate data: the destination's answer plus what the source knows of the guest."""
    migrate_data = dict(dest_check_data)
    migrate_data.update(
        {
            "source_host": host,
            "instance_uuid": guest.uuid,
            "vcpus": guest.vcpus,
            "memory_mb": guest.memory_mb,
            "root_gb": guest.root_gb,
            "image_ref": guest.image_ref,
            "volumes": dict(guest.volumes),
            "firewall_rules": [dict(r) for r in guest.rules],
        }
    )
    return migrate_data


def incoming_volumes(migrate_data: Mapping[str, Any]) -> dict[str, str]:
    """The volumes the incoming guest comes with (volume id -> mountpoint)."""
    return {str(k): str(v) for k, v in dict(migrate_data.get("volumes") or {}).items()}


def incoming_prepared(existing: GuestBase | None, uuid: str, source: Any) -> bool:
    """Whether the incoming guest is prepared already (a redelivered request from the same
    source); InstanceExists when this host holds the guest otherwise."""
    if existing is None:
        return False
    if existing.phase is GuestPhase.INCOMING and existing.migration_peer == source:
        return True
    raise InstanceExists(uuid=uuid)


def bandwidth_limit(migrate_data: Mapping[str, Any]) -> float | None:
    """The migration's bandwidth cap in MB/s, when the caller set a valid one."""
    value = migrate_data.get("bandwidth_limit_mb_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None
