"""The pre-copy live-migration model: memory copied in rounds while the guest dirties pages.

Pure arithmetic, no I/O, so it can be tested exactly and reused by benchmarks. Each round of
``round_interval_s`` (simulated) seconds copies ``min(remaining, bandwidth * dt)`` and the running
guest dirties ``dirty_rate * dt`` more (capped at its RAM size). The copy converges when what is
left could be sent within ``max_downtime_s`` (``remaining <= bandwidth * max_downtime_s``): the
guest is then paused, the rest is sent, and the destination takes over.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

MIB = 1024 * 1024


class NonConvergencePolicy(enum.StrEnum):
    """What to do when the copy does not converge within the round budgets."""

    ABORT = "abort"  # give up: MigrationNotConverging, guest keeps running on the source
    FORCE = "force"  # pause the guest (dirty rate drops to 0) so the copy converges


@dataclass(frozen=True)
class MigrationModel:
    """Parameters of the copy model (all rates in MB/s, times in simulated seconds)."""

    bandwidth_mb_s: float = 1000.0
    dirty_rate_mb_s: float = 100.0
    round_interval_s: float = 0.05
    max_downtime_s: float = 0.05
    #: Total rounds allowed before the non-convergence policy applies.
    max_rounds: int = 600
    #: Rounds in a row without a new low of ``remaining`` before the policy applies.
    stall_rounds: int = 40
    policy: NonConvergencePolicy = NonConvergencePolicy.ABORT
    #: Real seconds slept per simulated second; 0 is the fast copy model (no sleeping at all).
    time_scale: float = 1.0
    #: Minimum real seconds between two progress callbacks (the first and last always go out).
    progress_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if self.bandwidth_mb_s <= 0:
            raise ValueError("bandwidth_mb_s must be > 0")
        if self.dirty_rate_mb_s < 0 or self.max_downtime_s < 0 or self.time_scale < 0:
            raise ValueError("dirty_rate_mb_s, max_downtime_s and time_scale must be >= 0")
        if self.round_interval_s <= 0:
            raise ValueError("round_interval_s must be > 0")
        if self.max_rounds < 1 or self.stall_rounds < 1:
            raise ValueError("max_rounds and stall_rounds must be >= 1")
        if self.progress_interval_s < 0:
            raise ValueError("progress_interval_s must be >= 0")
        # Accept the policy as plain text from config.
        object.__setattr__(self, "policy", NonConvergencePolicy(self.policy))

    @property
    def downtime_threshold_bytes(self) -> int:
        """Remaining bytes at or below which the copy converges."""
        return int(self.bandwidth_mb_s * self.max_downtime_s * MIB)

    @property
    def real_round_sleep_s(self) -> float:
        """Real seconds the driver sleeps per round."""
        return self.round_interval_s * self.time_scale

    def with_overrides(self, values: Mapping[str, Any]) -> MigrationModel:
        """A copy with some parameters replaced (values may be text, as from the environment)."""
        known = {f.name: f.type for f in fields(self)}
        converted: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown migration model parameter {key!r}")
            current = getattr(self, key)
            if isinstance(current, enum.Enum):
                converted[key] = NonConvergencePolicy(str(value))
            elif isinstance(current, int):
                converted[key] = int(value)
            else:
                converted[key] = float(value)
        return replace(self, **converted)

    @classmethod
    def parse(cls, text: str, base: MigrationModel | None = None) -> MigrationModel:
        """Parse ``key=value,key=value`` (``[compute] migration``) on top of ``base``."""
        values: dict[str, str] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"bad migration model item {item!r} (expected key=value)")
            values[key.strip()] = value.strip()
        return (base or cls()).with_overrides(values)


@dataclass
class CopyState:
    """The evolving state of one memory copy."""

    memory_total: int
    memory_remaining: int
    memory_processed: int = 0
    rounds: int = 0
    simulated_s: float = 0.0
    best_remaining: int = -1
    rounds_since_best: int = 0
    paused: bool = False

    @classmethod
    def start(cls, memory_mb: int) -> CopyState:
        """Initial state: every page of the guest still has to be sent."""
        total = max(0, memory_mb) * MIB
        return cls(memory_total=total, memory_remaining=total, best_remaining=total)

    def step(self, model: MigrationModel, dirty_rate_mb_s: float | None = None) -> None:
        """Advance one round: copy what the bandwidth allows, then let the guest dirty pages."""
        dt = model.round_interval_s
        copied = min(self.memory_remaining, int(model.bandwidth_mb_s * dt * MIB))
        self.memory_remaining -= copied
        self.memory_processed += copied
        rate = (
            0.0
            if self.paused
            else (model.dirty_rate_mb_s if dirty_rate_mb_s is None else dirty_rate_mb_s)
        )
        dirtied = int(rate * dt * MIB)
        self.memory_remaining = min(self.memory_total, self.memory_remaining + dirtied)
        self.rounds += 1
        self.simulated_s += dt
        if self.memory_remaining < self.best_remaining:
            self.best_remaining = self.memory_remaining
            self.rounds_since_best = 0
        else:
            self.rounds_since_best += 1

    def converged(self, model: MigrationModel) -> bool:
        """True when the rest fits in the allowed downtime."""
        return self.memory_remaining <= model.downtime_threshold_bytes

    def out_of_budget(self, model: MigrationModel) -> bool:
        """True when the round budgets say this copy is not converging."""
        return self.rounds >= model.max_rounds or self.rounds_since_best >= model.stall_rounds

    def finish(self, model: MigrationModel) -> float:
        """Send the last dirty pages with the guest paused; returns the simulated downtime."""
        downtime = self.memory_remaining / (model.bandwidth_mb_s * MIB)
        self.memory_processed += self.memory_remaining
        self.memory_remaining = 0
        self.simulated_s += downtime
        return downtime

    def percent(self) -> int:
        """Completion estimate from the remaining dirty set (not monotonic by itself)."""
        if self.memory_total == 0:
            return 100
        return max(0, min(100, int(100 * (1 - self.memory_remaining / self.memory_total))))
