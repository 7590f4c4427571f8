"""Shared pieces of the RPC benchmark: the payload, the load loops and the statistics.

Every path's client process measures the same way: for each concurrency, ``c`` workers (asyncio
tasks, or threads for oslo.messaging) call in a closed loop; a short warm-up is discarded; then
calls are counted for ``duration`` seconds and each call's latency is recorded.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: Seconds of warm-up before each measured cell.
WARMUP_S = 0.5


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


def summarise(latencies: list[float], elapsed: float) -> dict[str, float]:
    """Calls per second and p50/p99 latency (ms) of one measured cell."""
    if not latencies:
        return {"calls_per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(latencies)
    p99_index = min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    return {
        "calls_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[p99_index] * 1000, 3),
        "calls": len(ordered),
    }


async def run_async_cell(
    call: Callable[[], Awaitable[Any]], concurrency: int, duration: float
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
    measured_from = time.perf_counter()
    await asyncio.gather(*workers)
    return summarise(latencies, time.perf_counter() - measured_from)


def run_thread_cell(call: Callable[[], Any], concurrency: int, duration: float) -> dict[str, float]:
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
    measured_from = time.perf_counter()
    for thread in threads:
        thread.join(duration + 120)
    return summarise(latencies, time.perf_counter() - measured_from)


def emit(message: dict[str, Any]) -> None:
    """One JSON line on stdout: how role processes talk to the orchestrator."""
    print(json.dumps(message), flush=True)
