"""The checks every driver makes on a guest record before it changes it: which phases allow an
action, what a redelivered request finds already done, the volumes a build asks for.

Driver-agnostic: the fake hypervisor and the QEMU driver make the same checks with the same
errors; what each then does (a QEMU process, a QMP command, a state file) stays in the driver.
"""

from __future__ import annotations

from compute_agent.virt._guest import GuestBase
from compute_agent.virt.driver import BlockDeviceInfo
from compute_agent.virt.exceptions import (
    InvalidGuestState,
    VolumeAlreadyAttached,
    VolumeNotAttached,
)
from compute_agent.virt.models import GuestPhase

#: Phases in which volumes may be attached, or detached (never while a migration holds the guest).
ATTACH_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.STOPPED})
DETACH_PHASES = frozenset({GuestPhase.RUNNING, GuestPhase.STOPPED, GuestPhase.ERROR})


def require_phase(guest: GuestBase, phase: GuestPhase, action: str) -> None:
    """Refuse ``action`` (InvalidGuestState) unless the guest is in ``phase``."""
    if guest.phase is not phase:
        raise InvalidGuestState(uuid=guest.uuid, phase=guest.phase.value, action=action)


def transition_needed(guest: GuestBase, to: GuestPhase, from_: GuestPhase, action: str) -> bool:
    """Whether ``guest`` must still move from ``from_`` to ``to``: False when it is there
    already (a redelivered request), InvalidGuestState when it is in neither phase."""
    if guest.phase is to:
        return False
    require_phase(guest, from_, action)
    return True


def removal_needed(guest: GuestBase | None, phase: GuestPhase, action: str) -> bool:
    """Whether this host's copy of a migrated guest must still be removed: False when it is gone
    already (a redelivered request), InvalidGuestState unless it is in ``phase`` (the half that
    no longer runs)."""
    if guest is None:
        return False
    require_phase(guest, phase, action)
    return True


def attach_needed(guest: GuestBase, volume_id: str, mountpoint: str) -> bool:
    """Whether ``volume_id`` must still be attached at ``mountpoint``: False when it is already
    (a redelivered request), InvalidGuestState outside ``ATTACH_PHASES``. The caller still
    checks that no other guest holds the volume."""
    if guest.volumes.get(volume_id) == mountpoint:
        return False
    if guest.phase not in ATTACH_PHASES:
        raise InvalidGuestState(uuid=guest.uuid, phase=guest.phase.value, action="attach a volume")
    return True


def check_detach(guest: GuestBase, volume_id: str) -> None:
    """Refuse to detach a volume the guest does not have, or outside ``DETACH_PHASES``."""
    if volume_id not in guest.volumes:
        raise VolumeNotAttached(uuid=guest.uuid, volume_id=volume_id)
    if guest.phase not in DETACH_PHASES:
        raise InvalidGuestState(uuid=guest.uuid, phase=guest.phase.value, action="detach a volume")


def volumes_from_bdi(uuid: str, block_device_info: BlockDeviceInfo | None) -> dict[str, str]:
    """The volumes a build asks for (volume id -> mountpoint); VolumeAlreadyAttached when the
    request names a volume or a mountpoint twice."""
    volumes: dict[str, str] = {}
    for bdm in block_device_info or ():
        volume_id = bdm["volume_id"]
        mountpoint = bdm.get("mountpoint") or bdm.get("device_name") or f"/dev/vd{len(volumes)}"
        if volume_id in volumes or mountpoint in volumes.values():
            raise VolumeAlreadyAttached(uuid=uuid, volume_id=volume_id, mountpoint=mountpoint)
        volumes[volume_id] = mountpoint
    return volumes
