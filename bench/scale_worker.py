"""One process of simulated hosts for ``bench/scale.py``: many real compute agents in one loop.

    python bench/scale_worker.py --hosts-file HOSTS.json [--start-concurrency 25]

``HOSTS.json`` maps each host name to its agent's transport URL (its own broker login and
password; the file is private to the run). Everything else comes from the ``FLEET_*``
environment, as for ``compute-agent``: control exchange, ``[security]`` login prefix, spawn
delay, state directory, report interval.

Each host is the real ``ComputeAgentService`` with its own transport (own AMQP connection and
login, own ``compute.<host>`` queue and consumer), its own fake hypervisor, heartbeat, claims
and resource tracker: only the process and the event loop are shared (the service supports
that: its conductor client is per task context, see ``docs/architecture.md``). Agents start
``--start-concurrency`` at a time (one agent's start is about ten conductor calls in sequence;
1,000 in series would take minutes). Once all have started (or failed) one JSON line
``{"ready": n, "failed": m, "seconds": s, "errors": [...]}`` goes to stdout; on SIGTERM/SIGINT
every agent is stopped (concurrently, short grace) and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import structlog

from compute_agent.service import ComputeAgentService
from shared_objects.runtime.config import load_config
from shared_objects.runtime.log import configure_logging

STOP_GRACE = 5.0

log = structlog.get_logger(__name__)


async def start_agents(
    urls: dict[str, str],
    concurrency: int,
    started: list[ComputeAgentService],
    errors: list[str],
) -> None:
    """Start one agent per host, ``concurrency`` at a time, into ``started`` (and ``errors``:
    filled as it goes, so a cancelled start still knows what to stop)."""
    base = load_config()
    gate = asyncio.Semaphore(concurrency)

    async def one(host: str, url: str) -> None:
        cfg = dataclasses.replace(
            base, host=host, messaging=dataclasses.replace(base.messaging, transport_url=url)
        )
        agent = ComputeAgentService(cfg)
        async with gate:
            try:
                await agent.start()
            except Exception as exc:  # reported to the orchestrator
                errors.append(f"{host}: {type(exc).__name__}: {str(exc)[:200]}")
                try:  # undo what the failed start opened (its connection, tasks)
                    await agent.stop(grace=0)
                except Exception:
                    log.warning("agent_stop_after_failed_start_failed", host=host, exc_info=True)
                return
        started.append(agent)

    await asyncio.gather(*(one(host, url) for host, url in urls.items()))


async def stop_agents(agents: list[ComputeAgentService]) -> None:
    gate = asyncio.Semaphore(100)

    async def one(agent: ComputeAgentService) -> None:
        async with gate:
            await agent.stop(grace=STOP_GRACE)

    await asyncio.gather(*(one(a) for a in agents), return_exceptions=True)


async def run(args: argparse.Namespace, urls: dict[str, str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    began = time.monotonic()
    agents: list[ComputeAgentService] = []
    errors: list[str] = []
    starting = asyncio.ensure_future(start_agents(urls, args.start_concurrency, agents, errors))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            report = {
                "ready": len(agents),
                "failed": len(errors),
                "seconds": round(time.monotonic() - began, 2),
                "errors": errors[:5],
            }
            print(json.dumps(report), flush=True)
            await stopping
    finally:
        # Told to stop while agents were still starting (a saturated conductor): give up on
        # those, stop the ones that started.
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await stop_agents(agents)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/scale_worker.py", description=__doc__)
    parser.add_argument("--hosts-file", required=True, help="JSON {host: transport URL}")
    parser.add_argument("--start-concurrency", type=int, default=25)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    configure_logging("json", args.log_level, stream=sys.stderr)
    urls: dict[str, str] = json.loads(Path(args.hosts_file).read_text())
    try:  # the services' own loop when installed (shared_objects.runtime.service_runner.run)
        import uvloop
    except ImportError:
        return asyncio.run(run(args, urls))
    return uvloop.run(run(args, urls))


if __name__ == "__main__":
    sys.exit(main())
