"""The source side of a QEMU live migration against a fake QMP server (no QEMU needed)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_qemu_qmp import FakeQMPServer, send

from compute_agent.virt._progress import ProgressReporter
from compute_agent.virt.exceptions import MigrationAborted, MigrationNotConverging
from compute_agent.virt.models import MigrationProgress
from compute_agent.virt.qemu.migration import CopyJob, copy
from compute_agent.virt.qemu.qmp import QMPClient

TOTAL = 128 * 1024 * 1024


class FakeMigration:
    """query-migrate answers: remaining shrinks by ``step`` per query (0: stalls)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.remaining = TOTAL
        self.status = "setup"
        self.commands: list[str] = []

    async def handle(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        cmd = message["execute"]
        self.commands.append(cmd)
        reply: Any = {}
        if cmd == "migrate":
            self.status = "active"
        elif cmd == "migrate_cancel":
            self.status = "cancelled"
        elif cmd == "migrate-start-postcopy":
            self.status, self.step = "postcopy-active", TOTAL
        elif cmd == "query-migrate":
            if self.status in ("active", "postcopy-active"):
                self.remaining = max(0, self.remaining - self.step)
                if self.remaining == 0:
                    self.status = "completed"
            reply = {
                "status": self.status,
                "ram": {
                    "total": TOTAL,
                    "transferred": TOTAL - self.remaining,
                    "remaining": self.remaining,
                    "dirty-sync-count": 1,
                },
                "downtime": 150,
                "total-time": 460,
            }
        send(writer, {"return": reply, "id": message["id"]})


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmig", dir="/tmp") as tmp:
        yield Path(tmp)


async def run(sock_dir: Path, fake: FakeMigration, job: CopyJob, **kw: Any) -> Any:
    server = FakeQMPServer(sock_dir / "m.sock", fake.handle)
    await server.start()
    client = await QMPClient.connect(server.path, timeout=2)
    reports: list[MigrationProgress] = []

    async def progress(p: MigrationProgress) -> None:
        reports.append(p)

    reporter = ProgressReporter(progress, 0.0, "u")
    try:
        kw.setdefault("bandwidth_mb_s", None)
        kw.setdefault("stall_s", 5.0)
        result = await copy(client, "u", "tcp:127.0.0.1:1", job, reporter, poll_s=0.01, **kw)
        return result, reports
    finally:
        await reporter.close()
        await client.close()
        await server.stop()


async def test_progress_comes_from_query_migrate_and_ends_completed(sock_dir: Path) -> None:
    fake = FakeMigration(step=TOTAL // 8)
    result, reports = await run(sock_dir, fake, CopyJob(dest="b"), bandwidth_mb_s=100)
    assert result.memory_total == TOTAL and result.downtime_s == 0.15
    assert "migrate-set-parameters" in fake.commands
    percents = [r.percent for r in reports]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(r.memory_total == TOTAL for r in reports)


async def test_abort_cancels_in_qemu(sock_dir: Path) -> None:
    fake = FakeMigration(step=1024)
    job = CopyJob(dest="b", abort_requested=True)
    with pytest.raises(MigrationAborted):
        await run(sock_dir, fake, job)
    assert "migrate_cancel" in fake.commands


async def test_a_stalled_copy_is_cancelled_and_force_switches_to_postcopy(sock_dir: Path) -> None:
    with pytest.raises(MigrationNotConverging):
        await run(sock_dir, FakeMigration(step=0), CopyJob(dest="b"), stall_s=0.1)
    fake = FakeMigration(step=0)
    result, _ = await run(sock_dir, fake, CopyJob(dest="b", force_requested=True))
    assert result.forced and "migrate-start-postcopy" in fake.commands
