"""``bench/scale.py`` still runs: one tiny run (3 simulated hosts, one conductor, seconds-long
phases) on the session's vhost and logins, checked for the keys its ``--json`` promises.

Figures are not checked: the benchmark reports them, it does not judge them on a shared machine.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from shared_objects.testing.broker_logins import BrokerLogins

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BENCH = Path(__file__).resolve().parents[3] / "bench"


@pytest.fixture
def scale() -> Iterator[ModuleType]:
    """``bench/scale.py`` as a module (it imports its sibling ``boot``, as when run as a script)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("scale")
    finally:
        sys.path.remove(str(BENCH))


async def test_scale_run_reports_every_promised_key(
    scale: ModuleType, broker_logins: BrokerLogins | None, amqp_vhost: str, tmp_path: Path
) -> None:
    if broker_logins is None:
        pytest.skip("needs the session's private vhost and broker logins")
    args = scale.parse_args(
        [
            "--hosts=3",
            "--no-floor",
            "--settle=0",
            "--window=2",
            "--schedule-probes=2",
            "--interactive-probes=3",
            "--storm-timeout=60",
            "--no-broker-stats",
            "--log-level=warning",
        ]
    )
    await broker_logins.ensure(hosts=scale.host_names(3), exchanges=[scale.EXCHANGE])

    result = await scale.run_one(args, broker_logins, tmp_path, 3, 1)

    missing = [key for key in scale.REQUIRED_KEYS if key not in result]
    assert not missing, f"missing keys {missing} in {result}"
    assert result["hosts"] == 3 and result["conductors"] == 1
    assert len(result["conductor_cpu_percent"]) == 1
    assert result["active_instances"] == 3 and result["stuck_instances"] == 0
    assert result["db_rows"]["compute_nodes"] == 3
    assert "3 " in scale.render([scale.with_derived(result, None)])
