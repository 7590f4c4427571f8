"""Configuration of the QEMU driver: from code, or a config table (``[compute]`` qemu_* options).

An agent builds it from ``ComputeConfig.qemu_driver_options()``; a value refused here is a
configuration error at the agent's start, like the fake's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from compute_agent.virt.qemu.image import DEFAULT_IMAGE_DIR

_ACCELS = {"kvm", "tcg", "kvm:tcg"}


@dataclass(frozen=True)
class QemuDriverConfig:
    """Everything that shapes one QEMU hypervisor."""

    #: Per-host guest directories live in ``<state_dir>/qemu-<host>/<uuid>/``.
    state_dir: Path = Path("fleet-state")
    #: The image catalogue (``image.py``); ``image_ref`` names a directory in it.
    image_dir: Path = DEFAULT_IMAGE_DIR
    #: Volume image files ``<volume_dir>/<volume_id>.img`` (created sparse on first attach);
    #: default ``<state_dir>/volumes``.
    volume_dir: Path | None = None
    qemu_binary: str = "qemu-system-x86_64"
    #: ``kvm:tcg`` uses KVM where it starts and TCG otherwise; ``tcg`` forces emulation (this
    #: machine kind: its nested /dev/kvm cannot run guests, see docs/virt.md).
    accel: str = "kvm:tcg"
    cpu_model: str = "max"
    #: RAM given to each guest (MiB); 0 = the flavor's memory_mb. The image needs >= 96.
    guest_memory_mb: int = 128
    #: Size of a volume file created on first attach (MiB).
    volume_size_mb: int = 64
    #: Hot-pluggable slots per guest (one PCIe root port per disk on q35).
    hotplug_slots: int = 8
    #: Seconds to the init's first heartbeat before a spawn fails (TCG on a busy host is slow).
    boot_timeout_s: float = 90.0
    #: Seconds a detach waits for the guest's DEVICE_DELETED.
    detach_timeout_s: float = 10.0
    #: Seconds for one QMP command.
    qmp_timeout_s: float = 10.0
    #: A live migration whose remaining RAM reaches no new low for this long is not
    #: converging: it is cancelled (MigrationNotConverging) unless force-complete was asked.
    migration_stall_s: float = 30.0
    vcpus: int = 32
    memory_mb: int = 65536
    local_gb: int = 1024
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0
    hypervisor_hostname: str | None = None

    def __post_init__(self) -> None:
        if self.accel not in _ACCELS:
            raise ValueError(f"accel must be one of {sorted(_ACCELS)}, not {self.accel!r}")
        if self.guest_memory_mb and self.guest_memory_mb < 96:
            raise ValueError("guest_memory_mb must be 0 (the flavor's) or >= 96")
        if not 1 <= self.hotplug_slots <= 30:
            raise ValueError("hotplug_slots must be 1..30")
        if (
            min(
                self.boot_timeout_s,
                self.detach_timeout_s,
                self.qmp_timeout_s,
                self.migration_stall_s,
            )
            <= 0
        ):
            raise ValueError("timeouts must be > 0")
        if self.volume_size_mb < 1:
            raise ValueError("volume_size_mb must be >= 1")

    @property
    def volumes_path(self) -> Path:
        """Where volume files live."""
        return self.volume_dir or self.state_dir / "volumes"

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: QemuDriverConfig | None = None
    ) -> QemuDriverConfig:
        """Build from a config table; keys are the field names, empty strings mean default."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        converted: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown qemu driver option {key!r}")
            if value in (None, ""):
                continue
            current = getattr(base, key)
            try:
                if key in ("state_dir", "image_dir", "volume_dir"):
                    converted[key] = Path(value).expanduser()
                elif isinstance(current, str) or key == "hypervisor_hostname":
                    converted[key] = str(value)
                elif isinstance(current, int):
                    converted[key] = int(value)
                else:
                    converted[key] = float(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key}: {exc}") from exc
        return replace(base, **converted)
