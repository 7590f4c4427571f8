"""Configuration of the fake hypervisor: from code, or a config table.

An agent builds it from its ``[compute]`` section (``ComputeConfig.fake_driver_options()``);
a value refused here is a configuration error at the agent's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from compute_agent.virt.failures import parse_failure_spec
from compute_agent.virt.migration_model import MigrationModel

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class FakeDriverConfig:
    """Everything that shapes one fake hypervisor."""

    #: Directory of the per-host state files (``<state_dir>/<host>.json``); None: memory only.
    state_dir: Path | None = None
    vcpus: int = 32
    memory_mb: int = 65536
    local_gb: int = 1024
    #: The hypervisor's own hard limits (guest vCPUs are threads, so they overcommit; RAM and
    #: disk do not). The agent's resource tracker claims with its own ratios on top of this.
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0
    #: Real seconds a spawn takes (0 allowed).
    spawn_delay_s: float = 0.05
    migration: MigrationModel = field(default_factory=MigrationModel)
    #: Failure spec (``[compute] failures`` syntax), loaded into ``driver.failures`` at start.
    failures: str = ""
    #: A file holding more failure rules in the same syntax, re-read when it changes.
    failures_file: Path | None = None
    #: fsync state writes (only matters for power loss; a killed process loses nothing).
    fsync: bool = False
    #: Name the hypervisor reports; defaults to the host name.
    hypervisor_hostname: str | None = None

    def __post_init__(self) -> None:
        if min(self.vcpus, self.memory_mb, self.local_gb) < 0:
            raise ValueError("capacities must be >= 0")
        if (
            min(self.cpu_allocation_ratio, self.ram_allocation_ratio, self.disk_allocation_ratio)
            <= 0
        ):
            raise ValueError("allocation ratios must be > 0")
        if self.spawn_delay_s < 0:
            raise ValueError("spawn_delay_s must be >= 0")

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: FakeDriverConfig | None = None
    ) -> FakeDriverConfig:
        """Build from a config table (e.g. TOML ``[virt.fake]``); keys are the field names.

        ``migration`` may be a table of MigrationModel parameters or a ``key=value,...`` string.
        """
        base = base or cls()
        known = {f.name for f in fields(cls)}
        converted: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown fake driver option {key!r}")
            try:
                converted[key] = _convert(key, value, base)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from exc
        return replace(base, **converted)


def _convert(key: str, value: Any, base: FakeDriverConfig) -> Any:
    current = getattr(base, key)
    if key in ("state_dir", "failures_file"):
        return None if value in (None, "") else Path(value)
    if key == "hypervisor_hostname":
        return None if value in (None, "") else str(value)
    if key == "migration":
        if isinstance(value, MigrationModel):
            return value
        if isinstance(value, Mapping):
            return current.with_overrides(value)
        return MigrationModel.parse(str(value), base=current)
    if key == "failures":
        parse_failure_spec(str(value))  # refused here, at start, rather than at first use
        return str(value)
    if key == "fsync":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"bad boolean for fsync: {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        return int(value)
    return float(value)
