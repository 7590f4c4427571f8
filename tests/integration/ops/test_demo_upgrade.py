"""``make demo-upgrade`` (issue 16, 7): the narrated rolling upgrade from the previous release's
real code exits 0, says that both cross-release live migrations completed and that the compute
RPC cap lifted, and leaves no database and no broker login behind (unique names of its own,
dropped at the end).

Runs the module as ``make demo-upgrade`` does (a subprocess, about 20 s), in a temporary workdir.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from shared_objects import releases
from shared_objects.testing.broker_logins import Rabbitmqctl
from shared_objects.testing.isolation import PG_ADMIN_DSN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[3]


def test_demo_upgrade_exits_0_migrates_across_releases_and_lifts_the_cap(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conductor.tools.demo_upgrade", "--workdir", str(tmp_path / "demo")],
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
    # Broker logins of this run's own (a tag: never the documented names), deleted at the end.
    logins = re.search(
        r"conductor-1 as (fleet-conductor-([0-9a-f]+)-1), both old agents share '(\S+)'", out
    )
    # Without rabbitmqctl the demo runs on the guest login and prints no logins.
    assert (logins is not None) == (shutil.which("rabbitmqctl") is not None), out[:2000]
    if logins is not None:
        tag = logins.group(2)
        assert logins.group(3) == f"fleet-shared-{tag}", out[:2000]
        users = asyncio.run(broker_users())
        assert not {u for u in users if tag in u}, users


async def broker_users() -> set[str]:
    return {user["name"] for user in (await Rabbitmqctl().export_definitions())["users"]}


async def database_exists(name: str) -> bool:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()
