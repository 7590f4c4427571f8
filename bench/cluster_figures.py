"""What the cluster benchmarks (``boot.py``, ``scale.py``, ``migrate.py``) measure on a running
``LocalCluster``: instance timings from the database, the RPCs a conductor served (its
``/metrics``), the CPU each process and the machine used, and py-spy profiles.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from conductor.tools.cluster import LocalCluster


def plain_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def instance_times(dsn: str, where: str, *params: Any) -> list[tuple[float, float]]:
    """(created, became ACTIVE) as epoch seconds of the ACTIVE instances matching ``where``.

    ``updated_at`` of an ACTIVE instance nobody touched since is the conductor's clock at the
    save that made it ACTIVE. ``launched_at`` would say the same but travels as a versioned
    object field, which keeps whole seconds only: useless for millisecond figures.
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT created_at, updated_at FROM instances "
            f"WHERE vm_state = 'active' AND task_state IS NULL AND {where}",
            *params,
        )
    finally:
        await conn.close()
    return [(r["created_at"].timestamp(), r["updated_at"].timestamp()) for r in rows]


def summarize(count: int, started_at: float, times: list[tuple[float, float]]) -> dict[str, Any]:
    """Throughput and time-to-ACTIVE figures of one path."""
    if len(times) != count:
        raise RuntimeError(f"expected {count} ACTIVE instances, found {len(times)}")
    elapsed = max(active for _, active in times) - started_at
    to_active = [(active - created) * 1000 for created, active in times]
    return {
        "instances": count,
        "elapsed_s": round(elapsed, 3),
        "instances_per_s": round(count / elapsed, 1),
        "p50_ms": round(percentile(to_active, 50), 1),
        "p99_ms": round(percentile(to_active, 99), 1),
        "max_ms": round(max(to_active), 1),
    }


_SAMPLE = re.compile(r"^fleet_rpc_calls_total\{([^}]*)\}\s+([0-9.eE+-]+)$")


def scrape_server_calls(port: int) -> dict[str, float]:
    """``{method: calls}`` the service on ``port`` served (role server, every outcome)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    calls: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("role") == "server":
            method = labels.get("method", "?")
            calls[method] = calls.get(method, 0.0) + float(match.group(2))
    return calls


async def calls_delta(port: int, before: dict[str, float]) -> dict[str, float]:
    """Calls served since ``before``, read once the conductor is quiet.

    Work goes on after the last instance is ACTIVE (event and action finish, usage updates):
    wait until two scrapes a second apart agree (at most 30 s) so it is counted too.
    """
    after = await asyncio.to_thread(scrape_server_calls, port)
    for _ in range(30):
        await asyncio.sleep(1.0)
        again = await asyncio.to_thread(scrape_server_calls, port)
        if again == after:
            break
        after = again
    return {m: n - before.get(m, 0.0) for m, n in after.items() if n - before.get(m, 0.0) > 0}


def per_instance(calls: dict[str, float], count: int) -> dict[str, float]:
    return {m: round(n / count, 2) for m, n in sorted(calls.items())}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_cpu(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds used so far by the conductors and by the agents (summed per role)."""
    out = {"conductor": 0.0, "agents": 0.0}
    for name, handle in cluster.processes.items():
        if handle.process is None:
            continue
        role = "conductor" if name.startswith("conductor-") else "agents"
        out[role] += cpu_seconds(handle.process.pid)
    return out


def shared_cpu() -> dict[str, float]:
    """CPU seconds so far of the machine's RabbitMQ (``beam.smp``) and PostgreSQL processes.

    Shared with whoever else uses them, and PostgreSQL backends that exit in between are missed:
    an indication of the broker's and database's share, not an exact figure.
    """
    out = {"rabbitmq": 0.0, "postgres": 0.0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "beam.smp":
            out["rabbitmq"] += cpu_seconds(int(entry.name))
        elif comm == "postgres":
            out["postgres"] += cpu_seconds(int(entry.name))
    return out


def start_profilers(cluster: LocalCluster, outdir: Path) -> list[subprocess.Popen[bytes]]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, handle in cluster.processes.items():
        assert handle.process is not None
        procs.append(
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(handle.process.pid),
                    "--rate",
                    "100",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(outdir / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
