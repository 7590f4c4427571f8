"""Refusing to start in a fleet this release cannot serve (issue 6: startup refusals)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from conductor.testing import local_conductor
from shared_objects import exception, releases
from shared_objects.startup_checks import check_computes_supported, check_conductors_not_older


async def _service(conductor: object, host: str, binary: str, version: int) -> None:
    async with conductor.db_context() as ctxt:  # type: ignore[attr-defined]
        now = datetime.datetime.now(datetime.UTC)
        await ctxt.db.insert(
            "services",
            {
                "host": host,
                "binary": binary,
                "topic": None,
                "version": version,
                "disabled": False,
                "forced_down": False,
                "report_count": 0,
                "deleted": False,
                "last_seen_up": now,
                "created_at": now,
            },
        )


async def test_agent_newer_than_every_conductor_refuses_with_the_upgrade_order(
    tmp_path: Path,
) -> None:
    async with local_conductor(f"sqlite+aiosqlite:///{tmp_path}/a.db") as conductor:
        await _service(conductor, "c1", releases.BINARY_CONDUCTOR, releases.SERVICE_VERSION - 1)
        with pytest.raises(exception.ServiceTooNew, match="upgrade the conductors first"):
            await check_conductors_not_older(conductor.agent_context(), releases.BINARY_COMPUTE, 60)


async def test_agent_with_a_current_conductor_starts(tmp_path: Path) -> None:
    async with local_conductor(f"sqlite+aiosqlite:///{tmp_path}/b.db") as conductor:
        await _service(conductor, "c1", releases.BINARY_CONDUCTOR, releases.SERVICE_VERSION)
        await check_conductors_not_older(conductor.agent_context(), releases.BINARY_COMPUTE, 60)


async def test_conductor_refuses_computes_older_than_the_oldest_supported(tmp_path: Path) -> None:
    async with local_conductor(f"sqlite+aiosqlite:///{tmp_path}/c.db") as conductor:
        oldest = releases.RELEASES[0].service_version
        await _service(conductor, "ancient", releases.BINARY_COMPUTE, oldest - 1)
        async with conductor.db_context() as ctxt:
            with pytest.raises(exception.ServiceTooOld, match="ancient"):
                await check_computes_supported(ctxt, 60)
