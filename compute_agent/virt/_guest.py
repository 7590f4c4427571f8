"""The drivers' record of one guest, and its JSON form in their state files.

``GuestBase`` holds what every driver records of a guest (flavor, phase, volumes, firewall rules,
migration peer) and its JSON form; ``GuestRecord`` is the fake hypervisor's, the QEMU driver's
``QemuGuest`` (``qemu/guest.py``) adds the root ports and the accelerator.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.models import PHASE_POWER, GuestPhase, InstanceInfo, PowerState


@dataclass
class GuestBase:
    """What every driver records of one guest."""

    uuid: str
    vcpus: int
    memory_mb: int
    root_gb: int
    phase: GuestPhase
    image_ref: str | None = None
    volumes: dict[str, str] = field(default_factory=dict)
    rules: list[FirewallRule] = field(default_factory=list)
    migration_peer: str | None = None
    interrupted: str | None = None
    created_at: float = field(default_factory=time.time)

    def set_phase(self, phase: GuestPhase, peer: str | None = None) -> None:
        """Move to ``phase`` (with the migration peer it involves, if any)."""
        self.phase = phase
        self.migration_peer = peer
        # A later transition means recovery has dealt with whatever the restart interrupted.
        self.interrupted = None

    def info(self, power_state: PowerState | None = None) -> InstanceInfo:
        """The read-only view the driver hands out; ``power_state`` (from a real hypervisor)
        overrides the phase's default."""
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

    def to_json(self) -> dict[str, Any]:
        """The record as stored."""
        return {
            "uuid": self.uuid,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "root_gb": self.root_gb,
            "phase": self.phase.value,
            "image_ref": self.image_ref,
            "volumes": dict(self.volumes),
            "rules": [dict(r) for r in self.rules],
            "migration_peer": self.migration_peer,
            "interrupted": self.interrupted,
            "created_at": self.created_at,
        }

    @staticmethod
    def fields_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
        """The common fields' constructor arguments from the stored form (KeyError/ValueError
        /TypeError if malformed); a subclass's ``from_json`` adds its own."""
        return {
            "uuid": str(data["uuid"]),
            "vcpus": int(data["vcpus"]),
            "memory_mb": int(data["memory_mb"]),
            "root_gb": int(data["root_gb"]),
            "phase": GuestPhase(data["phase"]),
            "image_ref": data.get("image_ref"),
            "volumes": {str(k): str(v) for k, v in dict(data.get("volumes") or {}).items()},
            "rules": normalize_rules(data.get("rules") or []),
            "migration_peer": data.get("migration_peer"),
            "interrupted": data.get("interrupted"),
            "created_at": float(data.get("created_at", 0.0)),
        }


@dataclass
class GuestRecord(GuestBase):
    """One guest as the fake hypervisor stores it."""

    #: Per-guest override of the model's dirty rate (MB/s), a test hook.
    dirty_rate_mb_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as stored in the host's state file."""
        return {**super().to_json(), "dirty_rate_mb_s": self.dirty_rate_mb_s}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuestRecord:
        """Rebuild a record from the state file (KeyError/ValueError if malformed)."""
        return cls(**cls.fields_from_json(data), dirty_rate_mb_s=data.get("dirty_rate_mb_s"))
