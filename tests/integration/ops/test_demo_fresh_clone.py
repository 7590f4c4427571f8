"""``make demo`` from a fresh clone exits 0 and prints the fleet table (issue 7 e).

It builds a new virtualenv in the clone (pip install of the project and its dev dependencies,
pinned by ``constraints.txt``) before the demo runs: about 40 s with a warm pip cache (the one
``make test`` itself just used), so it runs in ``make test`` and CI.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest

from shared_objects.testing.isolation import PG_ADMIN_DSN

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(1000)
def test_make_demo_from_a_fresh_clone_exits_0_and_prints_the_fleet(tmp_path: Path) -> None:
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs make and git")
    clone = tmp_path / "fleet"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    done = subprocess.run(
        ["make", "demo"], cwd=clone, capture_output=True, text=True, timeout=900, check=False
    )
    tail = "\n".join(done.stdout.splitlines()[-30:])
    errors = done.stderr[-3000:]
    assert done.returncode == 0, f"make demo exited {done.returncode}:\n{tail}\n{errors}"
    assert "every process exited 0" in done.stdout, tail
    header = [line for line in done.stdout.splitlines() if line.startswith("| name")]
    assert header and "vm_state" in header[0], tail
    rows = [line for line in done.stdout.splitlines() if "| active" in line]
    assert len(rows) == 6, tail
    # Its own database (a unique name), dropped at the end.
    names = re.findall(r"PostgreSQL database '(fleet_demo_[0-9a-f]{12})'", done.stdout)
    assert len(names) == 1, done.stdout[:2000]
    assert not asyncio.run(database_exists(names[0]))


async def database_exists(name: str) -> bool:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()
