"""``make demo-upgrade`` (issue 16, 7): the narrated rolling upgrade from the previous release's
real code exits 0, says that both cross-release live migrations completed and that the compute
RPC cap lifted, and leaves no database behind (its own unique name, dropped at the end).

Runs the module as ``make demo-upgrade`` does (a subprocess, about 20 s), in a temporary workdir.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from shared_objects import releases
from shared_objects.testing.isolation import PG_ADMIN_DSN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[3]


def test_demo_upgrade_exits_0_migrates_across_releases_and_lifts_the_cap(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conductor.demo_upgrade", "--workdir", str(tmp_path / "demo")],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"exited {done.returncode}:\n{out[-3000:]}\n{done.stderr[-3000:]}"
    new = releases.CURRENT
    old = re.search(r"rolling upgrade from release (\S+) \(commit [0-9a-f]+\) to (\S+)", out)
    assert old and old.group(2) == new.name, out[:500]
    old_name = old.group(1)
    assert f"cap while compute-2 is old: {releases.by_name(old_name).compute_rpc_api}" in out, out
    assert f"live migration old ({old_name}) -> new ({new.name}): completed" in out, out
    assert f"live migration new ({new.name}) -> old ({old_name}): completed" in out, out
    assert f"cap after the upgrade: {new.compute_rpc_api} (release {new.name})" in out, out
    assert "every process exited 0" in out, out
    rows = [line for line in out.splitlines() if "| active" in line]
    assert len(rows) == 2, out
    # Its own database (a unique name), dropped at the end.
    names = re.findall(r"PostgreSQL database '(fleet_demo_[0-9a-f]+)'", out)
    assert len(names) == 1, out[:2000]
    assert not asyncio.run(database_exists(names[0]))


async def database_exists(name: str) -> bool:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()
