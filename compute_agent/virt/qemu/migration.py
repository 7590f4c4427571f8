"""The source side of a QEMU live migration: start it, follow ``query-migrate``, end it.

The copy itself is QEMU's (pre-copy over ``tcp:127.0.0.1:<port>``, switched to post-copy on
force-complete); this module turns its progress into ``MigrationProgress`` reports and its end
into the driver contract: return on ``completed`` (the source is then ``postmigrate``: paused,
the guest now runs on the destination), raise with the guest still running here otherwise —
``migrate_cancel`` on abort, on a stalled copy (the non-convergence policy) and on failure.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from compute_agent.virt._progress import ProgressReporter
from compute_agent.virt.exceptions import MigrationAborted, MigrationError, MigrationNotConverging
from compute_agent.virt.migration_model import CopyState
from compute_agent.virt.models import MigrationResult
from compute_agent.virt.qemu.qmp import QMPClient

#: Statuses of a copy still under way (QEMU's MigrationStatus).
ACTIVE = frozenset(
    {
        "setup",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "device",
        "pre-switchover",
        "wait-unplug",
        "cancelling",
    }
)
#: "No limit" for max-bandwidth (bytes/s): far above what loopback carries.
UNLIMITED_BYTES_S = 100 * 1024**3
#: Capabilities set on both sides (post-copy must be enabled on both to be switched to).
CAPABILITIES = [
    {"capability": "events", "state": True},
    {"capability": "postcopy-ram", "state": True},
]


@dataclass
class CopyJob:
    """Control block of one copy (abort and force requests, and its end)."""

    dest: str
    abort_requested: bool = False
    abort_reason: str = "aborted"
    force_requested: bool = False
    forced: bool = False
    switching: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the destination listens on it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def copy(
    client: QMPClient,
    uuid: str,
    uri: str,
    job: CopyJob,
    reporter: ProgressReporter,
    *,
    bandwidth_mb_s: float | None,
    stall_s: float,
    poll_s: float = 0.2,
    timeout: float = 10.0,
) -> MigrationResult:
    """Migrate to ``uri``; return once QEMU says ``completed``. See the module docstring."""
    await client.execute("migrate-set-capabilities", {"capabilities": CAPABILITIES}, timeout)
    # Always set: the parameter outlives this migration in the QEMU process, and QEMU's own
    # default (128 MiB/s) would cap a migration nobody limited.
    limit = int(bandwidth_mb_s * 1024 * 1024) if bandwidth_mb_s else UNLIMITED_BYTES_S
    await client.execute("migrate-set-parameters", {"max-bandwidth": limit}, timeout)
    await client.execute("migrate", {"uri": uri}, timeout)
    started = time.monotonic()
    best: int | None = None
    best_at = started
    state = CopyState(memory_total=0, memory_remaining=0)
    while True:
        info: dict[str, Any] = await client.execute("query-migrate", timeout=timeout)
        status = str(info.get("status"))
        ram = info.get("ram") or {}
        state.memory_total = int(ram.get("total", state.memory_total))
        state.memory_processed = int(ram.get("transferred", state.memory_processed))
        state.memory_remaining = int(ram.get("remaining", state.memory_remaining))
        state.rounds = int(ram.get("dirty-sync-count", state.rounds))
        if status == "completed":
            reporter.report(state, job.forced, final=True)
            return MigrationResult(
                rounds=state.rounds,
                memory_total=state.memory_total,
                memory_processed=state.memory_processed,
                downtime_s=float(info.get("downtime", 0)) / 1000,
                duration_s=float(info.get("total-time", 0)) / 1000,
                forced=job.forced,
            )
        if status in ("failed", "cancelled"):
            if job.abort_requested:
                raise MigrationAborted(
                    f"live migration of {uuid} aborted: {job.abort_reason}",
                    uuid=uuid,
                    rounds=state.rounds,
                )
            raise MigrationError(
                f"live migration of {uuid} failed in QEMU: {info.get('error-desc', status)}",
                uuid=uuid,
            )
        if state.memory_total:
            reporter.report(state, job.forced)
        if job.abort_requested and status != "cancelling":
            await client.execute("migrate_cancel", timeout=timeout)
        elif job.force_requested and not job.forced and status == "active":
            await client.execute("migrate-start-postcopy", timeout=timeout)
            job.forced = True
        elif not job.forced and not job.abort_requested and status == "active":
            if best is None or state.memory_remaining < best:
                best, best_at = state.memory_remaining, time.monotonic()
            elif time.monotonic() - best_at > stall_s:
                await client.execute("migrate_cancel", timeout=timeout)
                await _wait_not_active(client, timeout)
                raise MigrationNotConverging(
                    uuid=uuid, rounds=state.rounds, remaining=state.memory_remaining
                )
        await asyncio.sleep(poll_s)


async def _wait_not_active(client: QMPClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await client.execute("query-migrate", timeout=timeout)
        if str(info.get("status")) not in ACTIVE:
            return
        await asyncio.sleep(0.05)
