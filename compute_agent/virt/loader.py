"""Choosing and building the agent's driver from configuration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig

#: Driver names an agent's configuration may ask for.
DRIVERS = ("fake", "qemu")


def create_driver(kind: str = "fake", options: Mapping[str, Any] | None = None) -> ComputeDriver:
    """Build the driver ``kind`` from a config table (``FakeDriverConfig`` or
    ``QemuDriverConfig`` field names)."""
    if kind == "qemu":
        # Imported on demand: agents running the fake never load the QEMU package.
        from compute_agent.virt.qemu import QemuDriver, QemuDriverConfig

        return QemuDriver(QemuDriverConfig.from_mapping(options or {}))
    if kind != "fake":
        raise ValueError(f"unknown virt driver {kind!r}; known: {', '.join(DRIVERS)}")
    return FakeDriver(FakeDriverConfig.from_mapping(options or {}))
