"""Run the fault campaign (issue 13) and print its table: ``make faults`` (``--quick`` in
``make test``, through tests/faults/test_campaign_quick.py).

    .venv/bin/python tests/faults/run_campaign.py [--quick] [--json FILE|-] [--logs DIR]
                                                  [--only SUBSTRING] [--recovery-window S]

3 agents and 2 conductors on a private RabbitMQ node and a private PostgreSQL server, a fresh
cluster per fault. Exit status 0 when every fault left the fleet whole (invariants green, no
instance stuck), 1 otherwise, 2 when the harness itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import structlog

# tests/ is not a package: the campaign's modules sit beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign.faults import full_plan, quick_plan
from campaign.report import Row, table, to_json
from campaign.run import FULL_LOAD, QUICK_LOAD, run_campaign


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one fault of each kind, small load")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON ('-': stdout)")
    parser.add_argument("--logs", metavar="DIR", type=Path, help="keep the clusters' logs here")
    parser.add_argument("--only", metavar="SUBSTRING", help="only faults whose name contains it")
    parser.add_argument("--recovery-window", type=float, help="seconds (default 45 quick, 60)")
    parser.add_argument("--limit", type=float, default=1800.0, help="whole campaign, seconds")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    plan = quick_plan() if args.quick else full_plan()
    if args.only:
        plan = [f for f in plan if args.only.lower() in f.name.lower()]
    load = QUICK_LOAD if args.quick else FULL_LOAD
    window = args.recovery_window or (45.0 if args.quick else 60.0)
    # SIGTERM unwinds like Ctrl-C does: everything started is stopped and removed.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)

    def progress(row: Row) -> None:
        verdict = "error" if row.error else ("green" if row.green else "RED")
        print(f"[campaign] {row.fault}: {verdict} ({row.phase_seconds:.0f} s)", flush=True)

    started = time.monotonic()
    async with asyncio.timeout(args.limit):
        rows = await run_campaign(
            plan, load, recovery_window=window, workdir=args.logs, on_row=progress
        )
    took = time.monotonic() - started
    print()
    print(table(rows))
    print(f"\ncampaign: {len(rows)} faults in {took:.0f} s ({'quick' if args.quick else 'full'})")
    if args.json:
        doc = to_json(rows, mode="quick" if args.quick else "full", seconds=round(took, 1))
        if args.json == "-":
            print(doc)
        else:
            await asyncio.to_thread(Path(args.json).write_text, doc)
    if any(r.error for r in rows):
        return 2
    return 0 if all(r.green for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # The harness's own client chatter (connections, reply queues) would drown the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for name in ("aio_pika", "aiormq"):  # reconnect chatter during broker faults, by design
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM: all was unwound
        print("[campaign] interrupted; everything it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
