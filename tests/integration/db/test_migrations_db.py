"""Schema migrations: no drift from the models, `fleetctl db upgrade` is idempotent, and the
conductor refuses an unmigrated database."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from conductor.db import migration

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


async def _run(args: list[str], database_url: str, timeout: float = 60) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATABASE_URL=database_url,
        # A conductor login: the identity check comes before the database check.
        FLEET_TRANSPORT_URL="memory://fleet-conductor-1@unused/",
        FLEET_LOG_FORMAT="json",
    )
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_fleetctl_db_upgrade_twice_and_no_drift(database_url: str) -> None:
    code, out, _ = await _run([str(BIN / "fleetctl"), "db", "version"], database_url)
    assert code == 1 and "current: empty" in out
    code, out, err = await _run([str(BIN / "fleetctl"), "db", "upgrade"], database_url)
    assert code == 0, err
    assert f"upgraded from empty to {migration.head_revision()}" in out
    code, out, err = await _run([str(BIN / "fleetctl"), "db", "upgrade"], database_url)
    assert code == 0, err
    assert "already at" in out
    code, out, _ = await _run([str(BIN / "fleetctl"), "db", "version"], database_url)
    assert code == 0
    assert await migration.current_revision(database_url) == migration.head_revision()
    # The models and the migrated schema agree (what `alembic check` verifies).
    assert await migration.schema_drift(database_url) == []


async def test_drift_is_detected_when_the_schema_differs(database_url: str) -> None:
    from sqlalchemy import text

    from conductor.db.session import create_engine

    await migration.upgrade(database_url)
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE INDEX ix_extra ON instances (image_ref)"))
    await engine.dispose()
    diff = await migration.schema_drift(database_url)
    assert any("ix_extra" in repr(d) for d in diff)


async def test_conductor_refuses_to_start_on_an_unmigrated_database(database_url: str) -> None:
    code, _, err = await _run([str(BIN / "conductor")], database_url)
    assert code == 2
    assert "fleetctl db upgrade" in err
