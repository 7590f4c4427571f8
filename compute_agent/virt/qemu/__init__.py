"""Real guests: the QEMU driver, its QMP client and its guest image catalogue (docs/virt.md).

``create_driver("qemu", options)`` (``compute_agent.virt.loader``) builds it for an agent whose
``[compute] driver`` is ``qemu``; the package is imported only then.
"""

from compute_agent.virt.qemu.config import QemuDriverConfig
from compute_agent.virt.qemu.driver import QemuDriver
from compute_agent.virt.qemu.errors import (
    ImageNotFound,
    QemuError,
    QMPCommandError,
    QMPConnectionError,
    QMPError,
    QMPTimeout,
    VolumeDetachTimeout,
)
from compute_agent.virt.qemu.image import DEFAULT_IMAGE, GuestImage, ImageCatalogue, build_image
from compute_agent.virt.qemu.qmp import QMPClient

__all__ = [
    "DEFAULT_IMAGE",
    "GuestImage",
    "ImageCatalogue",
    "ImageNotFound",
    "QMPClient",
    "QMPCommandError",
    "QMPConnectionError",
    "QMPError",
    "QMPTimeout",
    "QemuDriver",
    "QemuDriverConfig",
    "QemuError",
    "VolumeDetachTimeout",
    "build_image",
]
