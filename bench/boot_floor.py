"""The floor of ``bench/boot.py``: a boot's object calls without the build flow.

A process calling objects through the conductor (``FleetObject.indirection_api =
ConductorAPI(...)``, like a compute agent, but on the operator login ``--url`` names: an agent may
not create instances) that, for each of ``--count`` instances, issues exactly the object calls
the build flow needs at minimum, through the same conductor: one ``Instance.create`` and the
three compare-and-swap saves of a successful build (scheduling → block_device_mapping →
spawning → active), with ``--concurrency`` instances in flight at once. No scheduler, no casts,
no claims, no instance actions, no notifications: what is left is the price of the indirection
path itself.

``--calls full`` issues instead every object call the build flow makes per instance, in its
order (create, action start, the three saves, the run_instance event start and finish, the BDM
and security-group-rule lookups, action finish): the build's object traffic without its
scheduling, casts, claims and notifications. ``bench/boot.py --decompose`` uses it to split the
gap between the floor and the build flow.

Run by ``bench/boot.py``; prints one JSON line ``{"event": "result", "started_at": <epoch s>,
"elapsed_s": ..., "cpu_s": ..., "count": ..., "latencies_ms": [...]}`` (latencies: client-side,
create to ACTIVE, per instance; cpu_s: this process's CPU time over the timed part).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time

from shared_objects.base import FleetObject
from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.fields import PowerState, TaskState, VMState
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_action_event import InstanceActionEvent
from shared_objects.objects.security_group import SecurityGroupList
from shared_objects.objects.security_group_rule import SecurityGroupRuleList
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import get_transport


async def boot_one(
    ctxt: RequestContext, flavor: Flavor, name: str, host: str, full: bool = False
) -> float:
    """Create one instance and walk it to ACTIVE with the build flow's CAS saves; seconds taken.

    ``full``: also the build flow's other object calls (actions, events, lookups).
    """
    started = time.perf_counter()
    if full:
        # One build request, one context: the action and its events are found by request id.
        ctxt = RequestContext(user_id=ctxt.user_id, project_id=ctxt.project_id, is_admin=True)
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
    if full:
        await InstanceAction.action_start(ctxt, inst.uuid, "create")
    inst.host = host
    inst.node = host
    inst.task_state = TaskState.BLOCK_DEVICE_MAPPING
    await inst.save(expected_task_state=[TaskState.SCHEDULING])
    if full:
        await InstanceActionEvent.event_start(ctxt, inst.uuid, "compute_run_instance", host)
        await BlockDeviceMappingList.get_by_instance_uuid(ctxt, inst.uuid)
        await SecurityGroupRuleList.get_by_instance(ctxt, inst.uuid)
    inst.task_state = TaskState.SPAWNING
    await inst.save(expected_task_state=[TaskState.BLOCK_DEVICE_MAPPING])
    inst.vm_state = VMState.ACTIVE
    inst.task_state = None
    inst.power_state = PowerState.RUNNING
    inst.launched_at = datetime.datetime.now(datetime.UTC)
    await inst.save(expected_task_state=[TaskState.SPAWNING])
    if full:
        await InstanceActionEvent.event_finish(ctxt, inst.uuid, "compute_run_instance")
        await InstanceAction.action_finish(ctxt, inst.uuid)
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, object]:
    cfg = MessagingConfig(transport_url=args.url, control_exchange=args.exchange)
    transport = get_transport(cfg, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
    await transport.connect()
    try:
        FleetObject.indirection_api = ConductorAPI(transport, timeout=120.0)
        ctxt = RequestContext(user_id="bench", project_id="bench", is_admin=True)
        flavor = await Flavor.get_by_name(ctxt, args.flavor)
        full = args.calls == "full"
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.count):
            queue.put_nowait(n)
        latencies: list[float] = []

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                name = f"{args.prefix}-{n}"
                latencies.append(await boot_one(ctxt, flavor, name, args.host, full))

        started_at = time.time()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        return {
            "event": "result",
            "started_at": started_at,
            "elapsed_s": elapsed,
            "cpu_s": cpu,
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
    parser.add_argument("--calls", choices=("minimal", "full"), default="minimal")
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
