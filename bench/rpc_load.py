"""Shared pieces of the RPC benchmark: the payload, the load loops and the statistics.

Every path's client process measures the same way: for each concurrency, ``c`` workers (asyncio
tasks, or threads for oslo.messaging) call in a closed loop; a short warm-up is discarded; then
calls are counted for ``duration`` seconds and each call's latency is recorded. Besides
throughput and latency, each cell reports the CPU time the client and the server processes spent
per call (from ``/proc``), which is far less sensitive to other load on a shared machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: Seconds of warm-up before each measured cell.
WARMUP_S = 0.5
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def make_payload() -> dict[str, Any]:
    """A ~1 KB JSON argument, shaped like a small object primitive rather than one big string."""
    payload: dict[str, Any] = {
        "uuid": "6f1c7a3e-1b2d-4c5e-8f90-123456789abc",
        "host": "compute-17",
        "vcpus": 4,
        "memory_mb": 8192,
        "tags": [f"tag-{i}" for i in range(12)],
        "metadata": {f"key{i}": f"value-{i:04d}" for i in range(16)},
    }
    filler = 1024 - len(json.dumps(payload))
    payload["note"] = "n" * max(filler - 12, 0)
    return payload


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used so far; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuMeter:
    """CPU used by this process and by the server process over one measured window."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._own = time.process_time()
        self._server = process_cpu(server_pid)

    def per_call_us(self, calls: int) -> dict[str, float]:
        """Microseconds of CPU per call since construction, for client and server."""
        if calls == 0:
            return {}
        out = {"client_cpu_us": round((time.process_time() - self._own) / calls * 1e6)}
        server_now = process_cpu(self.server_pid)
        if server_now is not None and self._server is not None:
            out["server_cpu_us"] = round((server_now - self._server) / calls * 1e6)
        return out


def summarise(latencies: list[float], elapsed: float, cpu: CpuMeter) -> dict[str, float]:
    """Calls per second, p50/p99 latency (ms) and CPU per call of one measured cell."""
    if not latencies:
        return {"calls_per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(latencies)
    p99_index = min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    return {
        "calls_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[p99_index] * 1000, 3),
        "calls": len(ordered),
        **cpu.per_call_us(len(ordered)),
    }


async def run_async_cell(
    call: Callable[[], Awaitable[Any]],
    concurrency: int,
    duration: float,
    server_pid: int | None = None,
) -> dict[str, float]:
    """Closed-loop load from ``concurrency`` tasks; warm-up, then ``duration`` s measured."""
    latencies: list[float] = []
    measuring = False
    stop_at = time.perf_counter() + WARMUP_S + duration

    async def worker() -> None:
        while True:
            started = time.perf_counter()
            if started > stop_at:
                return
            await call()
            if measuring:
                latencies.append(time.perf_counter() - started)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(WARMUP_S)
    measuring = True
    cpu = CpuMeter(server_pid)
    measured_from = time.perf_counter()
    await asyncio.gather(*workers)
    return summarise(latencies, time.perf_counter() - measured_from, cpu)


def run_thread_cell(
    call: Callable[[], Any],
    concurrency: int,
    duration: float,
    server_pid: int | None = None,
) -> dict[str, float]:
    """Closed-loop load from ``concurrency`` threads (for blocking clients such as oslo's)."""
    latencies: list[float] = []
    lock = threading.Lock()
    measuring = threading.Event()
    stop_at = time.perf_counter() + WARMUP_S + duration

    def worker() -> None:
        mine: list[float] = []
        while True:
            started = time.perf_counter()
            if started > stop_at:
                break
            call()
            if measuring.is_set():
                mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(WARMUP_S)
    measuring.set()
    cpu = CpuMeter(server_pid)
    measured_from = time.perf_counter()
    for thread in threads:
        thread.join(duration + 120)
    return summarise(latencies, time.perf_counter() - measured_from, cpu)


def emit(message: dict[str, Any]) -> None:
    """One JSON line on stdout: how role processes talk to the orchestrator."""
    print(json.dumps(message), flush=True)
