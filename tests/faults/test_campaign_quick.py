"""The fault campaign's quick form (issue 13, acceptance d): one fault of each kind, small load.

The whole campaign is ``make faults`` (tests/faults/run_campaign.py); this is the part ``make
test`` runs. Each fault gets a fresh 3-agent, 2-conductor cluster on a private RabbitMQ node and
a private PostgreSQL server; after the fault and a bounded recovery window every invariant must
hold and no instance may be stuck. On failure the table names the fault, the broken invariants
and the operations that did not end well; the clusters' logs stay under the test's tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from campaign.faults import quick_plan
from campaign.report import table
from campaign.run import QUICK_LOAD, run_campaign

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


async def test_quick_campaign_every_fault_leaves_the_fleet_whole(tmp_path: Path) -> None:
    rows = await run_campaign(
        quick_plan(), QUICK_LOAD, recovery_window=45.0, workdir=tmp_path / "campaign"
    )
    report = table(rows)
    print(report)
    assert [r.fault for r in rows if r.error] == [], report
    assert sum(r.stuck_instances for r in rows) == 0, report
    assert [r.fault for r in rows if not r.invariants_ok] == [], report
    # The faults really met work: every fault saw its operations attempted.
    assert all(r.attempted >= QUICK_LOAD.storm for r in rows), report
