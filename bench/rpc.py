"""RPC benchmark: Fleet against a raw aio-pika baseline and oslo.messaging, in one run.

    .venv/bin/python bench/rpc.py            # full run: 3 rounds x 5 s per cell (~3 min)
    .venv/bin/python bench/rpc.py --quick    # 1 round x 2 s per cell (~30 s)
    .venv/bin/python bench/rpc.py --json     # one JSON object instead of the table

Paths: ``fleet`` (``rpc_fleet.py``), ``raw_aiopika`` (``rpc_raw.py``), ``oslo`` (``rpc_oslo.py``).
For every path the server and the client are separate processes, started here, against the same
broker, with a ~1 KB payload echoed back; each client measures concurrency 1, 16 and 128 in turn.
All three servers stay up while the clients run in rounds, the path order rotated each round, and
each figure is the median over the rounds: slow phases of a shared machine hit every path alike.
The JSON result is ``{"<path>": {"<concurrency>": {"calls_per_s", "p50_ms", "p99_ms", ...}}}``
(extra keys: ``calls``, ``client_cpu_us`` and ``server_cpu_us``, CPU time per call).

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
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PATHS = ("fleet", "raw_aiopika", "oslo")
#: Paths run only when named in --paths: variants for experiments, not part of the targets.
EXTRA_PATHS = ("fleet_noconfirms",)
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
    elif path in ("fleet", "fleet_noconfirms"):
        if path == "fleet_noconfirms":
            uv = [*uv, "--no-confirms"]
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


class PathServer:
    """The server process of one path, started before and stopped after every round."""

    def __init__(self, path: str, url: str, args: argparse.Namespace) -> None:
        self.path = path
        self.url = url
        self.name = f"fleet-bench-{path}-{uuid.uuid4().hex[:8]}"
        self._args = args
        self.proc = subprocess.Popen(
            role_argv(path, "server", url, self.name, args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if args.verbose else subprocess.DEVNULL,
            text=True,
            env=role_env(),
        )

    def wait_ready(self) -> None:
        read_event(self.proc, "ready", time.monotonic() + 60)

    def run_client(self) -> dict[str, Any]:
        """Run this path's client once over every concurrency; its per-cell results."""
        args = self._args
        budget = (args.duration + 5) * len(args.concurrency) + 60
        argv = role_argv(self.path, "client", self.url, self.name, args)
        client = subprocess.Popen(
            [*argv, "--server-pid", str(self.proc.pid)],
            stdout=subprocess.PIPE,
            stderr=None if args.verbose else subprocess.DEVNULL,
            text=True,
            env=role_env(),
        )
        try:
            results: dict[str, Any] = read_event(client, "result", time.monotonic() + budget)[
                "results"
            ]
            return results
        finally:
            stop(client, close_stdin=False)

    def close(self) -> None:
        stop(self.proc, close_stdin=True)
        delete_broker_objects(self.url, self.name)


def role_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }


def stop(proc: subprocess.Popen[str], *, close_stdin: bool) -> None:
    """Let a role process end (closing stdin asks a server to stop); kill it after 30 s."""
    if close_stdin and proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median_cells(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency, the median of each metric over the rounds."""
    out: dict[str, Any] = {}
    for c in rounds[0]:
        cells = [r[c] for r in rounds if c in r]
        out[c] = {
            key: round(statistics.median(cell[key] for cell in cells), 3)
            for key in cells[0]
            if all(key in cell for cell in cells)
        }
    return out


def run_all(paths: list[str], url: str, args: argparse.Namespace) -> dict[str, Any]:
    """All servers up, then ``rounds`` rounds of every path's client (order rotated per round)."""
    servers = [PathServer(path, url, args) for path in paths]
    per_path: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    try:
        for server in servers:
            server.wait_ready()
        for round_no in range(args.rounds):
            shift = round_no % len(servers)
            for server in servers[shift:] + servers[:shift]:
                if not args.json:
                    print(f"round {round_no + 1}: {server.path} ...", file=sys.stderr, flush=True)
                per_path[server.path].append(server.run_client())
    finally:
        for server in servers:
            server.close()
    return {path: median_cells(rounds) for path, rounds in per_path.items()}


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


def format_cpu(cell: dict[str, float]) -> str:
    """``310 + 290 = 600``, or ``-`` when the CPU could not be measured."""
    if "client_cpu_us" not in cell or "server_cpu_us" not in cell:
        return "-"
    client, server = cell["client_cpu_us"], cell["server_cpu_us"]
    return f"{client:,.0f} + {server:,.0f} = {client + server:,.0f}"


def render_table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """A Markdown table (it goes straight into docs/performance.md) plus ratios and notes."""
    concurrencies = sorted({int(c) for cells in results.values() for c in cells})
    head = "| path | " + " | ".join(f"c={c}" for c in concurrencies) + " |"
    lines = [head, "|---" * (len(concurrencies) + 1) + "|"]
    for path in [*PATHS, *EXTRA_PATHS]:
        if path not in results:
            continue
        cells = []
        for c in concurrencies:
            cell = results[path].get(str(c))
            cells.append("-" if cell is None else format_cell(cell))
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("CPU per call, client + server (us):")
    lines.append("")
    lines.append(head)
    lines.append("|---" * (len(concurrencies) + 1) + "|")
    for path in [*PATHS, *EXTRA_PATHS]:
        if path in results:
            cpu = [format_cpu(results[path].get(str(c), {})) for c in concurrencies]
            lines.append(f"| {path} | " + " | ".join(cpu) + " |")
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
        f"- {meta['date']}, {meta['machine']}; median of {meta['rounds']} round(s) of "
        f"{meta['duration_s']} s per cell after 0.5 s warm-up"
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
    parser.add_argument("--quick", action="store_true", help="one round of ~2 s per cell")
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per cell and round (default 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds, median reported (default 3, quick 1)"
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
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_note(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "loop": "uvloop" if HAVE_UVLOOP and not args.no_uvloop else "asyncio default",
        "baseline_note": (
            "raw_aiopika: plain JSON body, reply_to/correlation_id properties, exclusive reply "
            "queue, publisher confirms ON (as Fleet's default), no envelope/context/dispatch"
        ),
    }
    paths = args.paths.split(",")
    unknown = set(paths) - {*PATHS, *EXTRA_PATHS}
    if unknown:
        parser.error(f"unknown path(s) {sorted(unknown)}; known: {[*PATHS, *EXTRA_PATHS]}")
    results = run_all(paths, args.url, args)
    meta["ratios"] = ratios(results)
    if args.json:
        print(json.dumps(results))
    else:
        print(render_table(results, meta))


if __name__ == "__main__":
    main()
