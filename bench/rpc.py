"""RPC benchmark: Fleet against a raw aio-pika baseline and oslo.messaging, in one run.

    .venv/bin/python bench/rpc.py            # full run (~10 s per cell)
    .venv/bin/python bench/rpc.py --quick    # ~2 s per cell
    .venv/bin/python bench/rpc.py --json     # one JSON object instead of the table

Paths: ``fleet`` (``rpc_fleet.py``), ``raw_aiopika`` (``rpc_raw.py``), ``oslo`` (``rpc_oslo.py``).
For every path the server and the client are separate processes, started here, against the same
broker, with a ~1 KB payload echoed back; each client measures concurrency 1, 16 and 128 in turn.
The JSON result is ``{"<path>": {"<concurrency>": {"calls_per_s", "p50_ms", "p99_ms"}}}``.

The machine this runs on is usually shared and small: compare the ratios of one run, never
absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PATHS = ("fleet", "raw_aiopika", "oslo")
CONCURRENCIES = (1, 16, 128)
TARGETS = {"fleet/raw_aiopika@128": 0.8, "fleet/oslo@16": 2.0}

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False


def role_argv(path: str, role: str, url: str, name: str, args: argparse.Namespace) -> list[str]:
    """Command line of one role process of one path."""
    uv = ["--uvloop"] if HAVE_UVLOOP and not args.no_uvloop else []
    if path == "raw_aiopika":
        argv = [str(HERE / "rpc_raw.py"), role, "--url", url, "--queue", name, *uv]
    elif path == "fleet":
        argv = [
            str(HERE / "rpc_fleet.py"),
            role,
            "--url",
            url,
            "--exchange",
            name,
            "--topic",
            name,
            *uv,
        ]
    else:
        argv = [str(HERE / "rpc_oslo.py"), role, "--url", url, "--exchange", name, "--topic", name]
    if role == "client":
        argv += [
            "--concurrency",
            ",".join(map(str, args.concurrency)),
            "--duration",
            str(args.duration),
        ]
    return [sys.executable, *argv]


def read_event(proc: subprocess.Popen[str], event: str, deadline: float) -> dict[str, Any]:
    """The next JSON line announcing ``event`` on ``proc``'s stdout (other lines are skipped)."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited ({proc.wait()}) before {event!r}")
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("event") == event:
            return message
    raise TimeoutError(f"no {event!r} from {proc.args!r}")


def run_path(path: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start the path's server, run its client to completion, stop the server."""
    name = f"fleet-bench-{path}-{uuid.uuid4().hex[:8]}"
    cell_budget = (args.duration + 5) * len(args.concurrency) + 60
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    server = subprocess.Popen(
        role_argv(path, "server", url, name, args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None if args.verbose else subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        read_event(server, "ready", time.monotonic() + 60)
        client = subprocess.Popen(
            role_argv(path, "client", url, name, args),
            stdout=subprocess.PIPE,
            stderr=None if args.verbose else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            results: dict[str, Any] = read_event(client, "result", time.monotonic() + cell_budget)[
                "results"
            ]
        finally:
            if client.poll() is None:
                try:
                    client.wait(30)
                except subprocess.TimeoutExpired:
                    client.kill()
                    client.wait()
    finally:
        assert server.stdin is not None
        server.stdin.close()  # the server's cue to stop
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        delete_broker_objects(url, name)
    return results


async def _delete(url: str, queues: list[str], exchanges: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url.replace("rabbit://", "amqp://", 1), timeout=10)
    async with connection:
        for name in queues:
            await (await connection.channel()).queue_delete(name)
        for name in exchanges:
            await (await connection.channel()).exchange_delete(name)


def delete_broker_objects(url: str, name: str) -> None:
    """Remove the queues and exchange one path's run left on the broker (they are not transient)."""
    asyncio.run(_delete(url, [name, f"{name}.bench"], [name]))


def ratios(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """fleet/raw_aiopika and fleet/oslo throughput ratios per concurrency."""
    out: dict[str, float] = {}
    fleet = results.get("fleet", {})
    for other in ("raw_aiopika", "oslo"):
        for c, cell in fleet.items():
            base = results.get(other, {}).get(c, {}).get("calls_per_s")
            if base:
                out[f"fleet/{other}@{c}"] = round(cell["calls_per_s"] / base, 2)
    return out


def format_cell(cell: dict[str, float]) -> str:
    """``1,234/s (p50 1.2 ms, p99 3.4 ms)``."""
    return (
        f"{cell['calls_per_s']:,.0f}/s (p50 {cell['p50_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} ms)"
    )


def render_table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """A Markdown table (it goes straight into docs/performance.md) plus ratios and notes."""
    concurrencies = sorted({int(c) for cells in results.values() for c in cells})
    head = "| path | " + " | ".join(f"c={c}" for c in concurrencies) + " |"
    lines = [head, "|---" * (len(concurrencies) + 1) + "|"]
    for path in PATHS:
        if path not in results:
            continue
        cells = []
        for c in concurrencies:
            cell = results[path].get(str(c))
            cells.append("-" if cell is None else format_cell(cell))
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, value in meta["ratios"].items():
        target = TARGETS.get(key)
        verdict = (
            ""
            if target is None
            else (f"  (target >= {target}: {'met' if value >= target else 'MISSED'})")
        )
        lines.append(f"- {key}: {value:.2f}x{verdict}")
    lines.append("")
    lines.append(
        f"- {meta['date']}, {meta['machine']}, {meta['duration_s']} s per cell after 0.5 s warm-up"
    )
    lines.append(f"- event loop (fleet, raw_aiopika): {meta['loop']}")
    lines.append(f"- {meta['baseline_note']}")
    return "\n".join(lines)


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load avg {load:.2f} at start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~2 s per cell")
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per cell (default 10, quick 2)"
    )
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument(
        "--url",
        default=os.environ.get("FLEET_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show the role processes' stderr")
    args = parser.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_note(),
        "duration_s": args.duration,
        "loop": "uvloop" if HAVE_UVLOOP and not args.no_uvloop else "asyncio default",
        "baseline_note": (
            "raw_aiopika: plain JSON body, reply_to/correlation_id properties, exclusive reply "
            "queue, publisher confirms ON (as Fleet's default), no envelope/context/dispatch"
        ),
    }
    results: dict[str, Any] = {}
    for path in args.paths.split(","):
        if not args.json:
            print(f"running {path} ...", file=sys.stderr, flush=True)
        results[path] = run_path(path, args.url, args)
    meta["ratios"] = ratios(results)
    if args.json:
        print(json.dumps(results))
    else:
        print(render_table(results, meta))


if __name__ == "__main__":
    main()
