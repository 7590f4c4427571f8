"""The QEMU driver's record of one guest (``<guest_dir>/guest.json``), written atomically.

The QEMU process holds the guest's memory; this file holds what QEMU does not know — the
instance's flavor, its phase as Fleet sees it, volumes with their mountpoints and root ports,
firewall rules — so a restarted agent can re-attach to the running process and rebuild the
device set when it boots the guest again.
"""

from __future__ import annotations

import json
import os
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.models import PHASE_POWER, GuestPhase, InstanceInfo, PowerState

RECORD = "guest.json"


@dataclass
class QemuGuest:
    """One guest of the QEMU driver."""

    uuid: str
    vcpus: int
    memory_mb: int
    root_gb: int
    phase: GuestPhase
    image_ref: str
    volumes: dict[str, str] = field(default_factory=dict)
    #: Root port index of each volume (``cmdline.Disk.port``).
    ports: dict[str, int] = field(default_factory=dict)
    rules: list[FirewallRule] = field(default_factory=list)
    #: The other host of a live migration this guest takes part in.
    migration_peer: str | None = None
    interrupted: str | None = None
    #: The accelerator QEMU reported (``query-kvm``): "kvm" or "tcg"; None until booted.
    accel: str | None = None
    created_at: float = field(default_factory=time.time)

    def info(self, power_state: PowerState | None = None) -> InstanceInfo:
        """The read-only view; ``power_state`` from QEMU overrides the phase's default."""
        return InstanceInfo(
            uuid=self.uuid,
            power_state=PHASE_POWER[self.phase] if power_state is None else power_state,
            phase=self.phase,
            vcpus=self.vcpus,
            memory_mb=self.memory_mb,
            root_gb=self.root_gb,
            volumes=dict(self.volumes),
            migration_peer=self.migration_peer,
            interrupted=self.interrupted,
        )

    def set_phase(self, phase: GuestPhase, peer: str | None = None) -> None:
        """Move to ``phase`` (with the migration peer it involves); clears ``interrupted``."""
        self.phase, self.migration_peer, self.interrupted = phase, peer, None

    def free_port(self, slots: int) -> int | None:
        """The lowest root port no volume uses, or None when all ``slots`` are taken."""
        used = set(self.ports.values())
        return next((i for i in range(1, slots + 1) if i not in used), None)

    def to_json(self) -> dict[str, Any]:
        """The record as stored."""
        return {
            "format": 1,
            "uuid": self.uuid,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "root_gb": self.root_gb,
            "phase": self.phase.value,
            "image_ref": self.image_ref,
            "volumes": dict(self.volumes),
            "ports": dict(self.ports),
            "rules": [dict(r) for r in self.rules],
            "migration_peer": self.migration_peer,
            "interrupted": self.interrupted,
            "accel": self.accel,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QemuGuest:
        """Rebuild from the stored form (KeyError/ValueError/TypeError if malformed)."""
        return cls(
            uuid=str(data["uuid"]),
            vcpus=int(data["vcpus"]),
            memory_mb=int(data["memory_mb"]),
            root_gb=int(data["root_gb"]),
            phase=GuestPhase(data["phase"]),
            image_ref=str(data["image_ref"]),
            volumes={str(k): str(v) for k, v in dict(data.get("volumes") or {}).items()},
            ports={str(k): int(v) for k, v in dict(data.get("ports") or {}).items()},
            rules=normalize_rules(data.get("rules") or []),
            migration_peer=data.get("migration_peer"),
            interrupted=data.get("interrupted"),
            accel=data.get("accel"),
            created_at=float(data.get("created_at", 0.0)),
        )


def write_record(guest_dir: Path, guest: QemuGuest) -> None:
    """Write ``guest.json`` atomically (blocking: call it in a thread)."""
    path = guest_dir / RECORD
    tmp = path.with_name(f".{RECORD}.{uuidlib.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(guest.to_json()), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_record(guest_dir: Path) -> QemuGuest:
    """Read ``guest.json`` (blocking); OSError/ValueError/KeyError if missing or malformed."""
    return QemuGuest.from_json(json.loads((guest_dir / RECORD).read_text(encoding="utf-8")))
