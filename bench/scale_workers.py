"""The simulated hosts of ``scale.py``: worker processes (``scale_worker.py``) of many real agents
each, started, waited for, stopped; and their names and memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conductor.tools.cluster import LocalCluster
from shared_objects.testing.broker_logins import BrokerLogins

HERE = Path(__file__).resolve().parent
EXCHANGE = "fleet-bench-scale"
FLAVOR = "bench.tiny"


FINAL_STATES = ("active", "error", "stopped")


_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr with the seconds since the benchmark started (long runs)."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def host_names(count: int) -> list[str]:
    return [f"sim-{n:04d}" for n in range(1, count + 1)]


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of ``pid`` in MiB (None once it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class Worker:
    name: str
    hosts: list[str]
    proc: asyncio.subprocess.Process
    log_path: Path
    report: dict[str, Any] | None = None


async def start_workers(
    args: argparse.Namespace, logins: BrokerLogins, hosts: list[str], workdir: Path
) -> list[Worker]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        {
            "FLEET_CONTROL_EXCHANGE": EXCHANGE,
            # Satisfies the configuration check; each agent gets its own login's URL.
            "FLEET_TRANSPORT_URL": logins.admin_url,
            "FLEET_COMPUTE__SPAWN_DELAY": "0",
            "FLEET_COMPUTE__STATE_DIR": str(workdir / "hypervisors"),
            "FLEET_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **logins.security_env(),
        }
    )
    if args.agent_levels_refresh is not None:
        env["FLEET_UPGRADE_LEVELS__REFRESH_INTERVAL"] = str(args.agent_levels_refresh)
    workers: list[Worker] = []
    per = args.hosts_per_worker
    for index, start in enumerate(range(0, len(hosts), per), 1):
        chunk = hosts[start : start + per]
        name = f"worker-{index}"
        hosts_file = workdir / f"{name}.hosts.json"
        urls = {h: logins.url_for(logins.host_login(h)) for h in chunk}
        fd = os.open(hosts_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # the logins' passwords: private to this user
            json.dump(urls, f)
        log_path = workdir / f"{name}.log"
        log_file = await asyncio.to_thread(open, log_path, "ab")
        with log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "scale_worker.py"),
                "--hosts-file",
                str(hosts_file),
                "--start-concurrency",
                str(args.start_concurrency),
                "--log-level",
                args.agent_log_level,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                preexec_fn=_die_with_parent,
            )
        workers.append(Worker(name, chunk, proc, log_path))
    return workers


async def wait_workers(workers: Sequence[Worker], timeout: float) -> tuple[int, bool]:
    """Until every worker has reported its start, at most ``timeout``: (agents that failed to
    start, whether the wait timed out). A saturated conductor makes starts slow or fail: the
    run goes on and reports it (it fails only if a worker died)."""

    async def one(worker: Worker) -> None:
        assert worker.proc.stdout is not None
        line = await worker.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{worker.name} exited {await worker.proc.wait()}: see its log")
        worker.report = json.loads(line)

    if not workers:
        return 0, False
    tasks = [asyncio.ensure_future(one(w)) for w in workers]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a worker that died fails the run
    reports = [w.report for w in workers if w.report]
    failed = sum(r["failed"] for r in reports)
    if failed:
        progress(f"agents failed to start: {[r['errors'][:2] for r in reports if r['failed']]}")
    if pending:
        progress(f"{len(pending)} worker(s) still starting agents after {timeout:.0f}s")
    return int(failed), bool(pending)


async def stop_workers(workers: Sequence[Worker], timeout: float = 120.0) -> None:
    """SIGTERM (each stops its agents: they mark their services down), SIGKILL after ``timeout``."""
    for worker in workers:
        if worker.proc.returncode is None:
            worker.proc.send_signal(signal.SIGTERM)

    async def wait(worker: Worker) -> None:
        try:
            await asyncio.wait_for(worker.proc.wait(), timeout)
        except TimeoutError:
            worker.proc.kill()
            await worker.proc.wait()

    await asyncio.gather(*(wait(w) for w in workers))


def pids(cluster: LocalCluster, conductors: int, workers: Sequence[Worker]) -> dict[str, int]:
    out = {}
    for index in range(1, conductors + 1):
        pid = cluster.pid_of(f"conductor-{index}")
        if pid is not None:
            out[f"conductor-{index}"] = pid
    out.update({w.name: w.proc.pid for w in workers})
    return out
