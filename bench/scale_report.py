"""How ``scale.py`` reports: figures derived against the floor run, the commit, the table."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from typing import Any

from scale_workers import HERE


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def with_derived(result: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, Any]:
    """Per-host figures: the run's conductor CPU above the floor's, per 100 hosts and per host."""
    total = sum(result["conductor_cpu_percent"])
    result["conductor_cpu_percent_total"] = round(total, 1)
    # Per host of those that were up in the window (a saturated start leaves some out).
    hosts = result.get("agents_registered", result["hosts"])
    if hosts and floor is not None:
        above = total - sum(floor["conductor_cpu_percent"])
        result["conductor_cpu_percent_per_100_hosts"] = round(above * 100 / hosts, 2)
        # % of one core = 10,000 µs of CPU per second.
        result["conductor_cpu_us_per_host_s"] = round(above * 10_000 / hosts, 1)
        result["agents_cpu_us_per_host_s"] = round(result["agents_cpu_percent"] * 10_000 / hosts, 1)
        workers = [v for k, v in result["rss_mb"].items() if k.startswith("worker-") and v]
        result["agent_rss_kb_per_host"] = round(sum(workers) * 1024 / hosts, 0)
        storm = result.get("boot_storm_cpu_ms_per_instance")
        if storm is not None:
            # The storm's conductor CPU less the steady-state background over the same time.
            count = result["boot_storm_instances"]
            background = total / 100 * result["boot_storm_window_s"] * 1000 / count
            result["boot_storm_conductor_cpu_ms_per_instance_net"] = round(
                storm["conductors"] - background, 1
            )
    return result


def _cell(result: dict[str, Any], key: str) -> str:
    value = result.get(key)
    return "-" if value is None else str(value)


def render(results: list[dict[str, Any]]) -> str:
    if not results:
        return "no runs"
    first = results[0]
    lines = [
        f"scale: {first.get('date', '?')}, commit {first.get('commit', '?')}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        f"{'hosts':>5} {'cond':>4} {'start s':>7} {'cond CPU %':>12} {'/100 hosts':>10} "
        f"{'µs/host/s':>9} {'agents %':>8} {'get p50/p99 ms':>15} {'list p99':>8} "
        f"{'sched p50/p99 ms':>17} {'storm inst/s':>12} {'storm p99 ms':>12} "
        f"{'stuck':>5} {'resched':>7} {'stale':>5}",
    ]
    for r in results:
        f = functools.partial(_cell, r)
        cpu = "+".join(f"{c:g}" for c in r["conductor_cpu_percent"])
        lines.append(
            f"{r['hosts']:>5} {r['conductors']:>4} {r['start_s']:>7} {cpu:>12} "
            f"{f('conductor_cpu_percent_per_100_hosts'):>10} "
            f"{f('conductor_cpu_us_per_host_s'):>9} {f('agents_cpu_percent'):>8} "
            f"{f('interactive_p50_ms'):>7}/{f('interactive_p99_ms'):<7} {f('list_p99_ms'):>8} "
            f"{f('schedule_p50_ms'):>8}/{f('schedule_p99_ms'):<8} "
            f"{f('boot_storm_instances_per_s'):>12} {f('boot_storm_p99_ms'):>12} "
            f"{f('stuck_instances'):>5} {f('reschedules'):>7} {f('stale_usage_reschedules'):>5}"
        )
    lines += ["", "RSS MiB, broker and database (steady state):"]
    for r in results:
        rss = ", ".join(f"{k} {v}" for k, v in r["rss_mb"].items())
        b = r["broker"]
        broker = (
            f"{b['connections']} connections, {b['queues']} queues "
            f"({b['queue_memory_mb']} MiB), node {b['node_memory_mb']} MiB"
            if b
            else "not measured"
        )
        lines.append(
            f"  {r['hosts']:>5} hosts, {r['conductors']} cond: {rss}; broker: {broker}; "
            f"db: {r['db_per_s']['xacts']} xact/s, rows {r['db_rows']}; "
            f"load {r['load_avg_1m']}"
        )
    return "\n".join(lines)
