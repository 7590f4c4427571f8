"""``fleetctl broker setup``: the RabbitMQ side of a Fleet deployment, from the configuration.

From ``[messaging]`` (the vhost of ``transport_url``, ``control_exchange``,
``rpc_response_timeout``) and ``[security]`` (login patterns), and the list of hosts, it makes
the broker hold:

* the vhost, the control exchange and the reply exchange (``fleet_reply``);
* one user per conductor, operator and agent host, with the permissions and topic permissions
  of its role (``shared_objects/testing/broker_logins/`` has the table, docs/security.md the
  reasoning) and per-user connection/channel limits;
* the policies bounding every Fleet queue (``fleet-rpc``, ``fleet-replies``, ``fleet-fanout``,
  ``fleet-notifications``; see ``BrokerLimits``).

It reads what the broker holds (``rabbitmqctl export_definitions``), prints one line per
difference and sends them all in one ``rabbitmqctl import_definitions``; a second run finds
nothing to change and says so. ``--dry-run`` prints the same lines and changes nothing.
Passwords: ``--secrets-dir`` holds one file per login (its password, mode 0600); a login whose
file exists keeps that password (and is left alone when the broker already has it), a missing
one gets a random password written there (not with ``--dry-run``).

Why rabbitmqctl rather than the management HTTP API: see docs/operations.md ("Broker setup").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from conductor.tools.fleetctl._base import CommandError
from shared_objects.rpc_clients import conductor as conductor_api
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.messaging.topology import REPLY_EXCHANGE, Topology
from shared_objects.testing.broker_logins import (
    BrokerLimits,
    BrokerLogins,
    CtlError,
    Rabbitmqctl,
    SetupCtl,
    SetupPlan,
    plan_setup,
)

NAME = "broker"
HELP = "the RabbitMQ side of a deployment: vhost, logins, permissions, policies, limits"


def _names(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or ():
        out += [part.strip() for part in value.split(",") if part.strip()]
    return out


def read_hosts(args: argparse.Namespace) -> list[str]:
    """``--hosts a,b`` (repeatable) and ``--hosts-file`` (one per line, ``#`` comments)."""
    hosts = _names(args.hosts)
    if args.hosts_file:
        try:
            text = Path(args.hosts_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read --hosts-file: {exc.strerror}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.append(line)
    return list(dict.fromkeys(hosts))


def _read_passwords(directory: Path | None, logins: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if directory is None:
        return found
    for login in logins:
        path = directory / login
        try:
            password = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        if not password:
            raise CommandError(f"{path} is empty")
        found[login] = password
    return found


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def limits_from(args: argparse.Namespace) -> BrokerLimits:
    fields = {f.name for f in dataclasses.fields(BrokerLimits)}
    return BrokerLimits(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def build_logins(
    args: argparse.Namespace, cfg: FleetConfig, hosts: Sequence[str], ctl: SetupCtl
) -> tuple[BrokerLogins, list[str]]:
    """The BrokerLogins of the deployment and the logins it names (passwords from files)."""

    def make(passwords: dict[str, str] | None = None) -> BrokerLogins:
        return BrokerLogins(
            cfg.messaging.transport_url,
            args.vhost,
            ctl=ctl,
            security=cfg.security,
            conductor_topic=conductor_api.TOPIC,
            # This release's queue names only (a rolling upgrade keeps using BrokerLogins'
            # legacy options, docs/upgrades.md).
            legacy_queue_names=False,
            agent_topic_queue=False,
            passwords=passwords,
        )

    conductors = _names(args.conductors) if args.conductors is not None else [""]
    operators = _names(args.operators) if args.operators is not None else [""]
    names = make()
    named = [
        *(names.conductor_login(c) for c in conductors),
        *(names.operator_login(o) for o in operators),
        *(names.host_login(h) for h in hosts),
    ]
    secrets_dir = Path(args.secrets_dir) if args.secrets_dir else None
    logins = make(_read_passwords(secrets_dir, named))
    logins.add(
        conductors=conductors,
        operators=operators,
        hosts=hosts,
        exchanges=[cfg.messaging.control_exchange],
    )
    return logins, named


async def make_plan(
    args: argparse.Namespace, cfg: FleetConfig, ctl: SetupCtl
) -> tuple[SetupPlan, BrokerLogins, list[str]]:
    hosts = read_hosts(args)
    try:
        logins, named = build_logins(args, cfg, hosts, ctl)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    limits = limits_from(args)
    if args.reply_ttl is None:
        # A reply older than the caller's timeout is useless.
        limits = dataclasses.replace(limits, reply_ttl=cfg.messaging.rpc_response_timeout)
    exchanges = [Topology(cfg.messaging).control_exchange(), REPLY_EXCHANGE]
    try:
        current = await ctl.export_definitions()
    except CtlError as exc:
        raise CommandError(str(exc)) from None
    return plan_setup(logins, current, limits, exchanges), logins, named


async def setup(args: argparse.Namespace, cfg: FleetConfig, ctl: SetupCtl | None = None) -> int:
    """Plan, print, and (unless ``--dry-run``) apply; exit 0 either way."""
    if ctl is None:
        ctl = Rabbitmqctl(args.rabbitmqctl, node=args.node)
    if args.vhost is None:
        from shared_objects.runtime.messaging.urls import parse_transport_url

        args.vhost = parse_transport_url(cfg.messaging.transport_url).virtual_host
    plan, logins, named = await make_plan(args, cfg, ctl)
    secrets_dir = Path(args.secrets_dir) if args.secrets_dir else None
    new_secrets = [
        login for login in named if secrets_dir is None or not (secrets_dir / login).exists()
    ]
    for line in plan.warnings:
        print(f"warning: {line}")
    for line in plan.actions:
        print(line)
    if args.dry_run:
        print(f"dry run: {len(plan.actions)} change(s) not applied")
        return 0
    if not plan.changes:
        print(f"nothing to change: vhost {args.vhost} already set up for {len(named)} login(s)")
        return 0
    changed_users = {u["name"] for u in plan.definitions.get("users", ())}
    unsaved = [login for login in new_secrets if login in changed_users]
    if unsaved and secrets_dir is None:
        raise CommandError(
            "new passwords need --secrets-dir (where each login's password is written, 0600): "
            + ", ".join(unsaved)
        )
    if secrets_dir is not None:
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for login in unsaved:
            _write_secret(secrets_dir / login, logins.password(login))
    try:
        await ctl.import_definitions(plan.definitions)
    except CtlError as exc:
        raise CommandError(str(exc)) from None
    where = f", passwords of new logins in {secrets_dir}" if unsaved else ""
    print(f"{len(plan.actions)} change(s) applied to vhost {args.vhost}{where}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "setup",
        help="create or update the vhost, logins, permissions, policies and limits (idempotent)",
    )
    p.add_argument("--hosts", action="append", help="agent hosts, comma-separated (repeatable)")
    p.add_argument("--hosts-file", help="file with one agent host per line")
    p.add_argument(
        "--conductors",
        action="append",
        help='conductor login names: "1,2" -> fleet-conductor-1, fleet-conductor-2 '
        '(default: one "fleet-conductor")',
    )
    p.add_argument(
        "--operators",
        action="append",
        help='operator login names: "alice" -> fleet-operator-alice (default: "fleet-operator")',
    )
    p.add_argument(
        "--secrets-dir",
        help="one file per login with its password (0600): read when present, written for new "
        "logins",
    )
    p.add_argument("--vhost", help="default: the vhost of [messaging] transport_url")
    p.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    p.add_argument("--rabbitmqctl", help="rabbitmqctl executable (default: from $PATH)")
    p.add_argument("--node", help="RabbitMQ node name (rabbitmqctl -n)")
    limits = p.add_argument_group("limits (0: none)")
    for field in dataclasses.fields(BrokerLimits):
        kind = float if field.type in ("float", float) else int
        limits.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=kind,
            default=None,
            help=f"default {field.default}",
        )
    p.set_defaults(func=setup)
