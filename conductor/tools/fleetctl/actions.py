"""``fleetctl action list|show``: an instance's history — its actions (one per request: create,
delete, live-migration, ...), their events (the steps, with their result) and its faults."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from conductor.tools.fleetctl._base import CommandError, name
from conductor.tools.fleetctl._output import emit, object_dict

if TYPE_CHECKING:
    from shared_objects.runtime.config import FleetConfig

ACTION_COLUMNS = ("request_id", "action", "start_time", "finish_time", "message")
ACTION_FIELDS = ("id", "request_id", "action", "instance_uuid", "user_id", "project_id")
EVENT_COLUMNS = ("event", "host", "start_time", "finish_time", "result", "details")
FAULT_COLUMNS = ("created_at", "code", "host", "message")


async def list_(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from conductor.tools.fleetctl.instances import find_instance
    from shared_objects.objects.instance_action import InstanceActionList

    async with session(args, cfg) as s:
        inst = await find_instance(s, args.instance)
        actions = await InstanceActionList.get_by_instance_uuid(s.ctxt, inst.uuid)
    emit(args, [object_dict(a, ACTION_COLUMNS) for a in actions], ACTION_COLUMNS)
    return 0


async def show(args: argparse.Namespace, cfg: FleetConfig) -> int:
    """One action with its events, and the faults recorded while it ran."""
    from conductor.tools.fleetctl._session import session
    from conductor.tools.fleetctl.instances import find_instance
    from shared_objects.objects.instance_action import InstanceActionList
    from shared_objects.objects.instance_action_event import InstanceActionEventList
    from shared_objects.objects.instance_fault import InstanceFaultList

    async with session(args, cfg) as s:
        inst = await find_instance(s, args.instance)
        actions = [
            a
            for a in await InstanceActionList.get_by_instance_uuid(s.ctxt, inst.uuid)
            if a.request_id == args.request_id
        ]
        if not actions:
            raise CommandError(f"instance {inst.uuid} has no action of request {args.request_id}")
        action = actions[-1]
        events = await InstanceActionEventList.get_by_action_id(s.ctxt, action.id)
        faults = await InstanceFaultList.get_by_instance_uuid(s.ctxt, inst.uuid)
    start, finish = action.start_time, action.finish_time
    during = [
        f
        for f in faults
        if f.created_at is not None
        and (start is None or f.created_at >= start)
        and (finish is None or f.created_at <= finish)
    ]
    record: dict[str, Any] = object_dict(action, (*ACTION_FIELDS, *ACTION_COLUMNS[2:]))
    event_rows = [object_dict(e, EVENT_COLUMNS) for e in events]
    fault_rows = [object_dict(f, FAULT_COLUMNS) for f in during]
    if args.format == "table" and not args.column:
        emit(args, record)
        print("events:")
        emit(args, event_rows, EVENT_COLUMNS)
        if fault_rows:
            print("faults:")
            emit(args, fault_rows, FAULT_COLUMNS)
        return 0
    emit(args, {**record, "events": event_rows, "faults": fault_rows})
    return 0


def register_commands(commands: Any) -> None:
    action = commands.add_parser(
        "action", help="an instance's actions, their events and faults"
    ).add_subparsers(dest="action_command", metavar="COMMAND", required=True)
    p = action.add_parser("list", help="the actions of an instance, oldest first")
    p.add_argument("instance", type=name, help="instance UUID or name")
    p.set_defaults(func=list_)
    p = action.add_parser("show", help="one action: its events and the faults it recorded")
    p.add_argument("instance", type=name, help="instance UUID or name")
    p.add_argument("request_id", type=name, help="the action's request id (from action list)")
    p.set_defaults(func=show)
