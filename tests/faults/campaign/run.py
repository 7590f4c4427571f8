"""Run a campaign: for each fault, a fresh cluster, the workload, the fault, then the invariant
check polled until it passes or the recovery window closes; one report row per fault.

    rows = await run_campaign(quick_plan(), QUICK_LOAD, recovery_window=45)

Every step has a time limit; whatever happens (a harness error, a timeout, Ctrl-C), every
process, node, server, database and temp directory is gone when this returns or raises.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from campaign.env import Infrastructure, Phase, Settings, honour_cancellation, phase_cluster
from campaign.faults import Fault, signal_all
from campaign.invariants import CheckResult, check
from campaign.report import Row
from campaign.workload import CALL_GUARD, FAILED_CLEAN, LOST, STUCK, SUCCEEDED, Load, Workload

QUICK_LOAD = Load(base=6, storm=6, storm_calls=2, deletes=2, migrations=2, volumes=2)
FULL_LOAD = Load(base=12, storm=20, storm_calls=4, deletes=4, migrations=4, volumes=4)
#: A fault that has not ended after this long is a harness problem (every fault is bounded).
FAULT_LIMIT = 120.0
CHECK_INTERVAL = 1.0


async def run_campaign(
    plan: Sequence[Fault],
    load: Load,
    *,
    recovery_window: float,
    settings: Settings | None = None,
    workdir: Path | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run every fault of ``plan`` in turn, each on its own cluster; the rows, in order."""
    settings = settings or Settings()
    rows: list[Row] = []
    async with Infrastructure(workdir) as infra:
        for fault in plan:
            row = await run_fault(infra, fault, load, settings, recovery_window)
            honour_cancellation()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


async def run_fault(
    infra: Infrastructure, fault: Fault, load: Load, settings: Settings, recovery_window: float
) -> Row:
    """One fault on a fresh cluster; harness errors are reported in the row, not raised."""
    row = Row(fault.name, fault.describe(), load.describe())
    started = time.monotonic()
    # Cluster start, base boot, the workload's calls, the window, teardown: all bounded.
    limit = settings.start_timeout + 60 + FAULT_LIMIT + CALL_GUARD * 2 + recovery_window + 60
    try:
        async with asyncio.timeout(limit) as deadline:
            async with phase_cluster(infra, _slug(fault.name), settings) as phase:
                row.logs = str(phase.cluster.workdir)
                await _strike_and_recover(phase, fault, load, recovery_window, row)
    except Exception as exc:  # a harness failure ends this fault's row, not the campaign
        # ... unless we are being cancelled (Ctrl-C) and a cleanup error took its place.
        honour_cancellation()
        if isinstance(exc, TimeoutError) and deadline.expired():
            row.error = f"phase did not finish within {limit:.0f} s"
        else:
            row.error = f"{type(exc).__name__}: {exc}"[:500]
    row.phase_seconds = round(time.monotonic() - started, 1)
    return row


async def _strike_and_recover(
    phase: Phase, fault: Fault, load: Load, recovery_window: float, row: Row
) -> None:
    loop = asyncio.get_running_loop()
    workload = Workload(phase, load)
    await workload.prepare()
    running = asyncio.create_task(workload.run())
    try:
        row.note = await asyncio.wait_for(fault.inject(phase), FAULT_LIMIT)
        fault_end = loop.time()
        await asyncio.wait_for(asyncio.shield(running), CALL_GUARD * 2 + load.spread)
    finally:
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    result = await _recover(phase, fault_end, recovery_window)
    if result.ok:
        row.recovery_s = round(loop.time() - fault_end, 1)
    row.invariants_ok = result.ok
    row.violations = result.violations
    counts = await workload.classify()
    row.attempted = counts.get("attempted", 0)
    row.succeeded = counts.get(SUCCEEDED, 0)
    row.failed_clean = counts.get(FAILED_CLEAN, 0)
    row.failed_unclean = counts.get(STUCK, 0) + counts.get(LOST, 0)
    row.stuck_instances = len(result.stuck)
    row.failed_ops = [
        {
            "kind": r.kind,
            "target": r.target,
            "api_error": r.api_error,
            "elapsed_s": None if r.elapsed is None else round(r.elapsed, 1),
            "outcome": r.outcome,
            "detail": r.detail,
        }
        for r in workload.records
        if r.outcome != SUCCEEDED
    ]
    if not result.ok:
        # Every process logs its asyncio tasks with their stacks: the hang's evidence.
        signal_all(phase, signal.SIGUSR2)
        await asyncio.sleep(1.0)
        row.stuck = await asyncio.to_thread(_evidence, phase, result)


async def _recover(phase: Phase, fault_end: float, window: float) -> CheckResult:
    """Poll the invariant check until it passes or ``window`` after the fault's end."""
    loop = asyncio.get_running_loop()
    while True:
        result = await check(phase)
        honour_cancellation()
        if result.ok or loop.time() - fault_end > window:
            return result
        await asyncio.sleep(CHECK_INTERVAL)


def _evidence(phase: Phase, result: CheckResult, per_instance: int = 4) -> list[dict[str, Any]]:
    """For each stuck instance: its state and the last log lines (any process) naming it."""
    texts = {
        name: handle.log_path.read_text(errors="replace")
        for name, handle in phase.cluster.processes.items()
    }
    out = []
    for uuid, where in list(result.stuck.items())[:20]:
        found = [
            (_timestamp(line), f"{name}: {line[:400]}")
            for name, content in texts.items()
            for line in content.splitlines()
            if uuid in line
        ]
        found.sort()
        out.append({"uuid": uuid, "state": where, "log": [t for _, t in found[-per_instance:]]})
    return out


_TIMESTAMP = re.compile(r'"timestamp": ?"([^"]+)"')


def _timestamp(line: str) -> str:
    match = _TIMESTAMP.search(line)
    return match.group(1) if match else ""


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
