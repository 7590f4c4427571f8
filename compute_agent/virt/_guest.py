"""The fake hypervisor's record of one guest, and its JSON form in the state file."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compute_agent.virt.firewall import FirewallRule, normalize_rules
from compute_agent.virt.models import PHASE_POWER, GuestPhase, InstanceInfo


@dataclass
class GuestRecord:
    """One guest as the fake hypervisor stores it."""

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
    #: Per-guest override of the model's dirty rate (MB/s), a test hook.
    dirty_rate_mb_s: float | None = None
    created_at: float = field(default_factory=time.time)

    def set_phase(self, phase: GuestPhase, peer: str | None = None) -> None:
        """Move to ``phase`` (with the migration peer it involves, if any)."""
        self.phase = phase
        self.migration_peer = peer
        # A later transition means recovery has dealt with whatever the restart interrupted.
        self.interrupted = None

    def info(self) -> InstanceInfo:
        """The read-only view the driver hands out."""
        return InstanceInfo(
            uuid=self.uuid,
            power_state=PHASE_POWER[self.phase],
            phase=self.phase,
            vcpus=self.vcpus,
            memory_mb=self.memory_mb,
            root_gb=self.root_gb,
            volumes=dict(self.volumes),
            migration_peer=self.migration_peer,
            interrupted=self.interrupted,
        )

    def to_json(self) -> dict[str, Any]:
        """The record as stored in the host's state file."""
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
            "dirty_rate_mb_s": self.dirty_rate_mb_s,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuestRecord:
        """Rebuild a record from the state file (KeyError/ValueError if malformed)."""
        return cls(
            uuid=str(data["uuid"]),
            vcpus=int(data["vcpus"]),
            memory_mb=int(data["memory_mb"]),
            root_gb=int(data["root_gb"]),
            phase=GuestPhase(data["phase"]),
            image_ref=data.get("image_ref"),
            volumes={str(k): str(v) for k, v in dict(data.get("volumes") or {}).items()},
            rules=normalize_rules(data.get("rules") or []),
            migration_peer=data.get("migration_peer"),
            interrupted=data.get("interrupted"),
            dirty_rate_mb_s=data.get("dirty_rate_mb_s"),
            created_at=float(data.get("created_at", 0.0)),
        )
