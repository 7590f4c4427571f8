"""Helpers shared by the virt tests (a uniquely named module: the tests have no packages)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from compute_agent.virt import FakeDriver, GuestPhase, GuestSpec, MigrationModel

#: A copy model that needs no real time: 100 migrations run in a blink.
FAST = MigrationModel(time_scale=0.0, progress_interval_s=0.0)

#: The ``make_driver`` fixture: ``await make_driver("host-a", memory_mb=..., ...)``.
MakeDriver = Callable[..., Awaitable[FakeDriver]]


def spec(uuid: str, vcpus: int = 1, memory_mb: int = 512, root_gb: int = 1) -> GuestSpec:
    """A small guest description."""
    return GuestSpec(uuid=uuid, vcpus=vcpus, memory_mb=memory_mb, root_gb=root_gb)


def stored_phase(state_dir: Path, host: str, uuid: str) -> str | None:
    """The guest's phase as the host's state file holds it now (None: not written yet)."""
    try:
        document = json.loads((state_dir / f"{host}.json").read_text())
    except FileNotFoundError:
        return None
    guest = (document.get("guests") or {}).get(uuid)
    return None if guest is None else str(guest["phase"])


async def spawning(driver: FakeDriver, uuid: str) -> bool:
    """The guest's spawn is under way (its record exists, not yet running)."""
    return await driver.get_phase(uuid) is GuestPhase.SPAWNING


def crash_copy(state_dir: Path, host: str, into: Path) -> Path:
    """Copy the host's state file into ``into``, as a crash at this instant would leave it."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(state_dir / f"{host}.json", into / f"{host}.json")
    return into
