"""Errors of the QEMU driver: the QMP client's own, and the VirtErrors the driver raises.

```
QMPError                      the QMP client (qmp.py); never leaves the driver
├── QMPConnectionError        socket missing, refused, closed, bad greeting
├── QMPTimeout                no reply / no event in time
└── QMPCommandError           QEMU answered {"error": {"class", "desc"}}

VirtError (compute_agent.virt.exceptions)
├── QemuError                 a QEMU process or command failed (kwargs: uuid, reason)
├── ImageNotFound             image_ref is not in the image catalogue
└── VolumeError ── VolumeDetachTimeout   the guest did not release the disk in time
```

The driver translates QMP errors into ``QemuError`` at one place (``driver._qmp_errors``).
"""

from __future__ import annotations

from typing import Any

from compute_agent.virt.exceptions import VirtError, VolumeError


class QMPError(Exception):
    """Base of the QMP client's errors."""


class QMPConnectionError(QMPError):
    """The QMP socket could not be reached, or the connection closed or spoke nonsense."""


class QMPTimeout(QMPError):
    """A command's reply or an awaited event did not come in time."""


class QMPCommandError(QMPError):
    """QEMU refused a command (its ``error`` reply)."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", "GenericError"))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QemuError(VirtError):
    """A QEMU process or QMP command failed for a guest."""

    msg_fmt = "qemu failed for instance %(uuid)s: %(reason)s"


class ImageNotFound(VirtError):
    """``image_ref`` names no image in the QEMU driver's catalogue."""

    msg_fmt = (
        "image %(image_ref)s not found in %(image_dir)s "
        "(build it with `make guest-image`; known: %(known)s)"
    )


class VolumeDetachTimeout(VolumeError):
    """The guest did not acknowledge the unplug (DEVICE_DELETED) in time; still attached."""

    msg_fmt = (
        "volume %(volume_id)s is still attached to instance %(uuid)s: the guest did not "
        "release the disk within %(timeout)s s (is it paused or hung?); try the detach again"
    )
