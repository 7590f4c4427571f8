"""The QEMU driver's record of one guest (``<guest_dir>/guest.json``), written atomically.

The QEMU process holds the guest's memory; this file holds what QEMU does not know — the
instance's flavor, its phase as Fleet sees it, volumes with their mountpoints and root ports,
firewall rules — so a restarted agent can re-attach to the running process and rebuild the
device set when it boots the guest again.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compute_agent.virt._guest import GuestBase

RECORD = "guest.json"


@dataclass
class QemuGuest(GuestBase):
    """One guest of the QEMU driver: the common record plus its root ports and accelerator."""

    #: The guest's image (always set here: QEMU boots its kernel and initramfs).
    image_ref: str = ""
    #: Root port index of each volume (``cmdline.Disk.port``).
    ports: dict[str, int] = field(default_factory=dict)
    #: The accelerator QEMU reported (``query-kvm``): "kvm" or "tcg"; None until booted.
    accel: str | None = None

    def free_port(self, slots: int) -> int | None:
        """The lowest root port no volume uses, or None when all ``slots`` are taken."""
        used = set(self.ports.values())
        return next((i for i in range(1, slots + 1) if i not in used), None)

    def to_json(self) -> dict[str, Any]:
        """The record as stored."""
        return {
            "format": 1,
            **super().to_json(),
            "ports": dict(self.ports),
            "accel": self.accel,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QemuGuest:
        """Rebuild from the stored form (KeyError/ValueError/TypeError if malformed)."""
        common = cls.fields_from_json(data)
        common["image_ref"] = str(data["image_ref"])
        return cls(
            **common,
            ports={str(k): int(v) for k, v in dict(data.get("ports") or {}).items()},
            accel=data.get("accel"),
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
