"""Scheduling cost per instance at 10 and 1,000 hosts: the cached host view against the
uncached read it replaced (issue 14, target: within 2x between 10 and 1,000 hosts).

    .venv/bin/python bench/scheduler.py             # 10 and 1,000 hosts, 200 builds each
    .venv/bin/python bench/scheduler.py --quick     # 50 builds each
    .venv/bin/python bench/scheduler.py --json      # one JSON object instead of the table

One run, in this process, on a fresh PostgreSQL database per host count (dropped at the end):
simulated hosts are written straight into the database (``conductor.testing.hosts``), and a
second engine changes two hosts' usage every 10 ms in the background, as agents reporting
would. Each build is ``BuildTask.build_instances(count=1)`` as the conductor runs it (flavor
lookup, host selection, instance, action and event records, on the driver path) with the cast
to the agent stubbed out, so what is measured is the conductor's database and CPU work per
scheduled instance. ``before`` reads every ComputeNode and Service row per build
(``conductor.tasks.hosts.load_host_states``); ``after`` uses the cached ``HostView``.

Both paths run against the same database in alternating order, two rounds each; the figures
are the median build time and the process CPU time per build. The machine is usually shared:
compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from typing import Any

from conductor.db import migration
from conductor.db.session import Database, create_engine
from conductor.host_view import FleetView, HostView
from conductor.tasks.build import BuildTask
from conductor.tasks.build_placement import BuildSettings
from conductor.tasks.hosts import load_host_states
from conductor.testing import hosts as sim
from shared_objects.context import RequestContext
from shared_objects.objects.flavor import Flavor
from shared_objects.runtime.log import configure_logging
from shared_objects.testing.isolation import fresh_database

FLAVOR = "bench.sched"


class NoCast:
    """The agents' RPC client, minus the agents: a build is placed and recorded, not sent."""

    def can_send_build_extras(self, host: str) -> bool:
        return True

    async def run_instance(self, *_args: Any, **_kwargs: Any) -> None:
        return None


class UncachedView:
    """The read the host view replaced: every row, per decision."""

    def __init__(self, service_down_time: float) -> None:
        self.service_down_time = service_down_time

    async def fleet(self, ctxt: Any, *, fresh: bool = False) -> FleetView:
        view = await load_host_states(ctxt, self.service_down_time)
        return FleetView(view.states, view.reported_at)


async def _usage_changes(url: str, hosts: list[str], stop: asyncio.Event) -> int:
    """Two hosts report new usage every 10 ms, and every host beats every 5 s (one batched
    statement), until ``stop``; returns how many usage reports."""
    engine = create_engine(url, pool_size=1)
    rng = random.Random(14)
    reports = 0
    beat_at = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() - beat_at >= 5.0:
                await sim.heartbeat(engine, hosts)
                beat_at = time.monotonic()
            await sim.report_usage(
                engine, {h: rng.randrange(0, 4096) for h in rng.sample(hosts, 2)}
            )
            reports += 2
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.01)
    finally:
        await engine.dispose()
    return reports


async def _builds(task: BuildTask, count: int, cpu: list[float] | None = None) -> list[float]:
    """Wall time of each build; the process CPU time of all of them is appended to ``cpu``
    (it includes the background writer's few reports)."""
    times: list[float] = []
    cpu_started = time.process_time()
    for i in range(count):
        ctxt = RequestContext(user_id="bench", project_id="bench")
        started = time.perf_counter()
        await task.build_instances(ctxt, flavor=FLAVOR, name=f"b{i}")
        times.append(time.perf_counter() - started)
    if cpu is not None:
        cpu.append((time.process_time() - cpu_started) / count)
    return times


async def measure(hosts: int, builds: int) -> dict[str, Any]:
    async with fresh_database("fleet_bench_sched") as url:
        await migration.upgrade(url)
        names = sim.host_names(hosts)
        writer = create_engine(url, pool_size=1)
        try:
            await sim.insert_hosts(writer, names, vcpus=4096, memory_mb=1 << 24, local_gb=1 << 20)
        finally:
            await writer.dispose()
        database = Database(url)
        try:
            ctxt = RequestContext(user_id="bench", project_id="bench")
            async with database.request(ctxt):
                await Flavor(
                    ctxt, name=FLAVOR, flavorid=FLAVOR, vcpus=1, memory_mb=64, root_gb=1
                ).create()
            settings = BuildSettings()
            cached = HostView()
            paths: dict[str, BuildTask] = {
                "before": BuildTask(
                    database,
                    NoCast(),  # type: ignore[arg-type]
                    settings,
                    UncachedView(settings.service_down_time),  # type: ignore[arg-type]
                ),
                "after": BuildTask(database, NoCast(), settings, cached),  # type: ignore[arg-type]
            }
            stop = asyncio.Event()
            background = asyncio.create_task(_usage_changes(url, names, stop))
            times: dict[str, list[float]] = {"before": [], "after": []}
            cpu: dict[str, list[float]] = {"before": [], "after": []}
            try:
                for path in paths.values():
                    await _builds(path, 5)  # warm: statements prepared, view read
                order = ["before", "after"]
                for _round in range(2):
                    for name in order:
                        times[name] += await _builds(paths[name], builds // 2, cpu[name])
                    order.reverse()
            finally:
                stop.set()
                reports = await background
        finally:
            await database.dispose()
    stats = cached.stats
    return {
        "hosts": hosts,
        "builds": builds,
        "before_ms": statistics.median(times["before"]) * 1000,
        "after_ms": statistics.median(times["after"]) * 1000,
        "before_cpu_ms": statistics.median(cpu["before"]) * 1000,
        "after_cpu_ms": statistics.median(cpu["after"]) * 1000,
        "before_p99_ms": _p99(times["before"]) * 1000,
        "after_p99_ms": _p99(times["after"]) * 1000,
        "view_delta_reads": stats.delta_reads,
        "view_full_reads": stats.full_reads,
        "view_rows_per_read": round(
            (stats.node_rows + stats.service_rows - 2 * hosts) / max(stats.delta_reads, 1), 1
        ),
        "usage_reports": reports,
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 builds per path and size")
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("console", "warning", stream=sys.stderr)
    builds = 50 if args.quick else args.builds
    rows = [await measure(n, builds) for n in (10, 1000)]
    small, large = rows
    result = {
        "sizes": rows,
        "ratio_1000_vs_10_before": round(large["before_ms"] / small["before_ms"], 2),
        "ratio_1000_vs_10_after": round(large["after_ms"] / small["after_ms"], 2),
        "cpu_ratio_1000_vs_10_before": round(large["before_cpu_ms"] / small["before_cpu_ms"], 2),
        "cpu_ratio_1000_vs_10_after": round(large["after_cpu_ms"] / small["after_cpu_ms"], 2),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{'hosts':>6} {'before ms':>10} {'after ms':>9} {'CPU before':>11} {'CPU after':>10}"
        f" {'p99 before':>11} {'p99 after':>10} {'view rows/read':>15}"
    )
    for r in rows:
        print(
            f"{r['hosts']:>6} {r['before_ms']:>10.2f} {r['after_ms']:>9.2f}"
            f" {r['before_cpu_ms']:>11.2f} {r['after_cpu_ms']:>10.2f}"
            f" {r['before_p99_ms']:>11.2f} {r['after_p99_ms']:>10.2f}"
            f" {r['view_rows_per_read']:>15}"
        )
    print(
        "cost at 1,000 hosts / at 10 hosts (median wall, CPU): "
        f"before {result['ratio_1000_vs_10_before']}x, {result['cpu_ratio_1000_vs_10_before']}x;"
        f" after {result['ratio_1000_vs_10_after']}x, {result['cpu_ratio_1000_vs_10_after']}x"
        " (target: within 2x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
