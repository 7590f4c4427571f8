"""Start-up cost of ``fleetctl``: CPU time (user + system of the child process, from
``os.wait4``) of ``fleetctl --help`` and ``fleetctl --format json list`` against ``python -c
pass``, in the same run. Target (issue 16): both below 0.3 s.

    .venv/bin/python bench/cli.py            # 7 runs of each, medians
    .venv/bin/python bench/cli.py --quick    # 3 runs
    .venv/bin/python bench/cli.py --json

``list`` needs a conductor: a local cluster with one conductor and no agent is started on a
fresh SQLite database and a private control exchange of the broker in ``$FLEET_TEST_TRANSPORT_URL``
(default: guest on 127.0.0.1:5672), holding ``--instances`` instance rows (default 20). CPU
time, not wall time: the machine may be shared; the ratio to ``python -c pass`` is what travels.
Each case runs once unmeasured first, so that bytecode is cached as in an installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

TARGET_S = 0.3


def cpu_of(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU seconds of one run of ``argv`` (which must exit 0)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {err.strip()}")
    if proc.stderr:
        proc.stderr.close()
    return usage.ru_utime + usage.ru_stime


async def measure(runs: int, instances: int) -> dict[str, float]:
    from conductor.tools.cluster import ClusterSpec, LocalCluster
    from shared_objects.objects.instance import Instance
    from shared_objects.testing.broker_logins import BrokerLogins

    url = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
    # Logins of its own (a conductor and an operator), deleted at the end.
    logins = BrokerLogins(url, tag=uuid.uuid4().hex[:6], exchange_pattern=r"fleet-bench-.*")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-cli-") as tmp:
        spec = ClusterSpec(
            database_url=f"sqlite+aiosqlite:///{tmp}/fleet.db",
            transport_url=url,
            control_exchange=f"fleet-bench-{uuid.uuid4().hex[:10]}",
            hosts=(),
            workdir=Path(tmp) / "cluster",
            logins=logins,
        )
        cluster = LocalCluster(spec)
        await cluster.start()
        try:
            for i in range(instances):
                await Instance(
                    cluster.ctxt,
                    uuid=str(uuid.uuid4()),
                    name=f"bench-{i}",
                    vm_state="active",
                    vcpus=1,
                    memory_mb=64,
                    root_gb=1,
                ).create()
            env = cluster._base_env(cluster.operator_login)
            # As installed (pip compiles bytecode): cached .pyc files, written by a first,
            # unmeasured run of each case even where PYTHONDONTWRITEBYTECODE is set.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            fleetctl = [sys.executable, "-m", "conductor.tools.fleetctl"]
            cases = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "fleetctl --help": [*fleetctl, "--help"],
                "fleetctl --format json list": [*fleetctl, "--format", "json", "list"],
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for argv in cases.values():
                await asyncio.to_thread(cpu_of, argv, env)
            for _ in range(runs):
                for name, argv in cases.items():
                    samples[name].append(
                        await asyncio.to_thread(cpu_of, argv, env)  # type: ignore[arg-type]
                    )
        finally:
            await cluster.stop()
            await logins.delete()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 7")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    result = asyncio.run(measure(runs, args.instances))
    base = result["python -c pass"]
    if args.json:
        ratios = {k: v / base for k, v in result.items()}
        print(json.dumps({"cpu_s": result, "ratio": ratios, "runs": runs}, indent=2))
    else:
        print(f"CPU time (user+sys, median of {runs}); target below {TARGET_S} s")
        for name, value in result.items():
            mark = "" if name == "python -c pass" else ("  ok" if value < TARGET_S else "  OVER")
            print(f"  {name:<30} {value:6.3f} s  {value / base:5.1f} x python{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
