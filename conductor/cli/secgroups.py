"""``fleetctl secgroup create|list|rule-add|rule-delete``: security groups and their rules."""

from __future__ import annotations

import argparse
from typing import Any

from conductor.cli._output import emit
from conductor.cli._session import session
from shared_objects.config import FleetConfig

GROUP_COLUMNS = ("id", "name", "rules", "instances")
RULE_COLUMNS = ("id", "group_id", "protocol", "from_port", "to_port", "cidr")


async def create(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        group_id = await s.tasks.security_group_create(
            s.ctxt, name=args.name, description=args.description
        )
    emit(args.format, {"id": group_id, "name": args.name}, ())
    return 0


async def list_(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        groups = await s.tasks.security_group_list(s.ctxt)
    if args.format == "json":
        emit(args.format, groups, ())
        return 0
    rows = []
    for g in groups:
        rules = ", ".join(
            f"#{r['id']} {r['protocol']} {r['from_port']}-{r['to_port']} {r['cidr']}"
            for r in g["rules"]
        )
        rows.append({**g, "rules": rules or "-", "instances": len(g["instances"])})
    emit(args.format, rows, GROUP_COLUMNS)
    return 0


async def rule_add(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        result = await s.tasks.security_group_rule_add(
            s.ctxt,
            group=args.group,
            protocol=args.protocol,
            from_port=args.from_port,
            to_port=args.to_port,
            cidr=args.cidr,
        )
    _report(args, result)
    return 0


async def rule_delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        result = await s.tasks.security_group_rule_delete(s.ctxt, rule_id=args.rule_id)
    _report(args, result)
    return 0


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.format == "json":
        emit(args.format, result, ())
        return
    hosts = result["refreshed_hosts"]
    where = ", ".join(f"{h} ({n})" for h, n in sorted(hosts.items())) or "no host"
    print(f"rules refreshed on {where}")


def register_commands(commands: Any) -> None:
    secgroup = commands.add_parser("secgroup", help="security groups").add_subparsers(
        dest="secgroup_command", metavar="COMMAND", required=True
    )
    p = secgroup.add_parser("create", help="create a security group")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.set_defaults(func=create)
    secgroup.add_parser("list", help="groups, their rules and member count").set_defaults(
        func=list_
    )
    p = secgroup.add_parser("rule-add", help="add a rule; member hosts apply it")
    p.add_argument("group")
    p.add_argument("--protocol", required=True, choices=("tcp", "udp", "icmp"))
    p.add_argument("--from-port", type=int, required=True)
    p.add_argument("--to-port", type=int, required=True)
    p.add_argument("--cidr", default="0.0.0.0/0")
    p.set_defaults(func=rule_add)
    p = secgroup.add_parser("rule-delete", help="delete a rule; member hosts apply it")
    p.add_argument("rule_id", type=int)
    p.set_defaults(func=rule_delete)
