"""Helpers for the object integration tests (a module with a unique name: tests import it
directly, and several test directories have a ``conftest``)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from shared_objects.context import RequestContext
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.messaging import MessagingTimeout
from shared_objects.testing.eventually import eventually


@dataclass
class ConductorProcess:
    process: asyncio.subprocess.Process
    env: dict[str, str]
    log_path: Path
    database_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def fleet_env(**values: str) -> dict[str, str]:
    """The environment of a Fleet subprocess: ours minus any FLEET_* setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(values)
    return env


async def wait_for_conductor(api: ConductorAPI, deadline: float = 30.0) -> None:
    """Ping until a conductor answers (bounded)."""

    async def answers() -> bool:
        try:
            return bool(await api.ping(RequestContext(), "up", wait=1.0) == "up")
        except MessagingTimeout:
            return False

    await eventually(answers, deadline, interval=0.2, what="a conductor answering ping")
