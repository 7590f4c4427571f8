"""The floor of ``bench/boot.py``: a boot's object calls without the build flow.

An agent-like process (``FleetObject.indirection_api = ConductorAPI(...)``, like a compute agent)
that, for each of ``--count`` instances, issues exactly the object calls the build flow needs at
minimum, through the same conductor: one ``Instance.create`` and the three compare-and-swap saves
of a successful build (scheduling → block_device_mapping → spawning → active), with
``--concurrency`` instances in flight at once. No scheduler, no casts, no claims, no instance
actions, no notifications: what is left is the price of the indirection path itself.

Run by ``bench/boot.py``; prints one JSON line ``{"event": "result", "started_at": <epoch s>,
"elapsed_s": ..., "count": ..., "latencies_ms": [...]}`` (client-side create→active per instance).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time

from conductor.rpcapi import ConductorAPI
from shared_objects.base import FleetObject
from shared_objects.config import MessagingConfig
from shared_objects.context import RequestContext
from shared_objects.fields import PowerState, TaskState, VMState
from shared_objects.messaging import get_transport
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance
from shared_objects.objects.security_group import SecurityGroupList

EXMODS = ["shared_objects.exception", "compute_agent.virt.exceptions"]


async def boot_one(ctxt: RequestContext, flavor: Flavor, name: str, host: str) -> float:
    """Create one instance and walk it to ACTIVE with the build flow's CAS saves; seconds taken."""
    started = time.perf_counter()
    inst = Instance(
        ctxt,
        name=name,
        user_id=ctxt.user_id,
        project_id=ctxt.project_id,
        vm_state=VMState.BUILDING,
        task_state=TaskState.SCHEDULING,
        power_state=None,
        image_ref="fake-image",
        flavor=flavor,
        launch_index=0,
        progress=0,
        security_groups=SecurityGroupList(ctxt, objects=[]),
    )
    await inst.create()
    inst.host = host
    inst.node = host
    inst.task_state = TaskState.BLOCK_DEVICE_MAPPING
    await inst.save(expected_task_state=[TaskState.SCHEDULING])
    inst.task_state = TaskState.SPAWNING
    await inst.save(expected_task_state=[TaskState.BLOCK_DEVICE_MAPPING])
    inst.vm_state = VMState.ACTIVE
    inst.task_state = None
    inst.power_state = PowerState.RUNNING
    inst.launched_at = datetime.datetime.now(datetime.UTC)
    await inst.save(expected_task_state=[TaskState.SPAWNING])
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, object]:
    cfg = MessagingConfig(transport_url=args.url, control_exchange=args.exchange)
    transport = get_transport(cfg, allowed_remote_exmods=EXMODS)
    await transport.connect()
    try:
        FleetObject.indirection_api = ConductorAPI(transport, timeout=120.0)
        ctxt = RequestContext(user_id="bench", project_id="bench", is_admin=True)
        flavor = await Flavor.get_by_name(ctxt, args.flavor)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.count):
            queue.put_nowait(n)
        latencies: list[float] = []

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                latencies.append(await boot_one(ctxt, flavor, f"{args.prefix}-{n}", args.host))

        started_at = time.time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        return {
            "event": "result",
            "started_at": started_at,
            "elapsed_s": elapsed,
            "count": len(latencies),
            "latencies_ms": [round(s * 1000, 3) for s in latencies],
        }
    finally:
        FleetObject.indirection_api = None
        await transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--flavor", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--prefix", default="floor")
    parser.add_argument("--host", default="floor-host", help="host recorded on the instances")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
