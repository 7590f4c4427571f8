"""The QEMU command line of a guest, and the QMP arguments of a hot-plugged disk.

Pure functions (unit-tested without QEMU). Names QEMU sees are derived from Fleet's ids:
QEMU ids must start with a letter and node names are at most 31 characters, so a volume's are
a short hash of its id (``vol-<12 hex>`` / ``disk-<12 hex>``); PCIe root ports are ``rp<N>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: File names inside a guest's directory.
SERIAL_LOG = "serial.log"
QMP_SOCKET = "qmp.sock"
#: A second monitor for operators and tests (the agent holds the first; a QMP socket serves one
#: client at a time). Events go to both.
QMP_TOOLS_SOCKET = "qmp-tools.sock"
PID_FILE = "qemu.pid"
QEMU_LOG = "qemu.log"


@dataclass(frozen=True)
class Disk:
    """A volume connected to a guest: its file and the root port it sits on."""

    volume_id: str
    path: Path
    port: int

    @property
    def node_name(self) -> str:
        """The block node (``blockdev-add``'s ``node-name``)."""
        return f"vol-{_short(self.volume_id)}"

    @property
    def device_id(self) -> str:
        """The guest device (``device_add``'s ``id``; ``DEVICE_DELETED``'s ``data.device``)."""
        return f"disk-{_short(self.volume_id)}"

    @property
    def bus(self) -> str:
        """The PCIe root port the disk is plugged into."""
        return port_id(self.port)

    def blockdev(self) -> dict[str, Any]:
        """``blockdev-add`` arguments (also the ``-blockdev`` JSON at a cold start)."""
        return {
            "driver": "raw",
            "node-name": self.node_name,
            "file": {"driver": "file", "filename": str(self.path)},
        }

    def device(self) -> dict[str, Any]:
        """``device_add`` arguments (also the ``-device`` JSON at a cold start)."""
        return {
            "driver": "virtio-blk-pci",
            "id": self.device_id,
            "drive": self.node_name,
            "bus": self.bus,
        }


def port_id(index: int) -> str:
    """The id of PCIe root port ``index`` (1-based)."""
    return f"rp{index}"


def volume_file_name(volume_id: str) -> str:
    """The file of a volume in the volume directory (ids are UUIDs; anything else is hashed)."""
    safe = all(c.isalnum() or c in "-_." for c in volume_id) and not volume_id.startswith(".")
    return f"{volume_id}.img" if safe and volume_id else f"vol-{_short(volume_id, 32)}.img"


def _short(text: str, length: int = 12) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:length]


def accel_args(accel: str) -> list[str]:
    """``-accel`` options: ``kvm:tcg`` lists both, QEMU takes the first that initialises."""
    args: list[str] = []
    for name in accel.split(":"):
        args += ["-accel", name]
    return args


def build_command(
    *,
    binary: str,
    uuid: str,
    kernel: Path,
    initrd: Path,
    memory_mb: int,
    guest_dir: Path,
    accel: str,
    cpu_model: str,
    hotplug_slots: int,
    disks: Sequence[Disk] = (),
    extra_append: str = "",
    incoming: bool = False,
) -> list[str]:
    """The command line of one guest: no network, serial and QMP in ``guest_dir``, daemonized.

    QEMU runs with ``guest_dir`` as its working directory: the QMP socket is bound by a relative
    name, so deep state directories do not hit the 107-byte unix socket path limit.
    """
    cmd = [
        binary,
        "-name",
        f"fleet-{uuid}",
        "-uuid",
        uuid,
        "-machine",
        "q35",
        *accel_args(accel),
        "-cpu",
        cpu_model,
        "-m",
        str(memory_mb),
        "-smp",
        "1",
        "-nic",
        "none",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console=ttyS0 quiet panic=-1 {extra_append}".strip(),
        "-serial",
        f"file:{guest_dir / SERIAL_LOG}",
        "-qmp",
        f"unix:{QMP_SOCKET},server=on,wait=off",
        "-qmp",
        f"unix:{QMP_TOOLS_SOCKET},server=on,wait=off",
        "-pidfile",
        str(guest_dir / PID_FILE),
        "-daemonize",
    ]
    for index in range(1, hotplug_slots + 1):
        cmd += [
            "-device",
            f"pcie-root-port,id={port_id(index)},bus=pcie.0,chassis={index},slot={index}",
        ]
    for disk in disks:
        cmd += ["-blockdev", _json(disk.blockdev()), "-device", _json(disk.device())]
    if incoming:
        # A live migration's destination: waits for migrate-incoming to name its listen URI.
        cmd += ["-incoming", "defer"]
    return cmd


def _json(value: Mapping[str, Any]) -> str:
    # JSON option syntax needs no escaping of commas in file names (unlike key=value).
    return json.dumps(value, separators=(",", ":"))
