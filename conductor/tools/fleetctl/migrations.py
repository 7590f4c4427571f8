"""``fleetctl live-migrate``, ``migrations`` and ``live-migration abort|force-complete``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any, TextIO

from conductor.tools.fleetctl._base import CommandError, name, positive_int, seconds, uuid_arg
from conductor.tools.fleetctl._output import emit, message

if TYPE_CHECKING:
    from conductor.tools.fleetctl._session import Session
    from shared_objects.runtime.config import FleetConfig

FINAL = frozenset({"completed", "failed", "error", "cancelled"})
LIST_COLUMNS = ("uuid", "instance_uuid", "source_compute", "dest_compute", "status", "progress")


def percent(migration: dict[str, Any]) -> int:
    """Progress in percent: the share of memory no longer left to copy (re-dirtied pages count
    as left), or the instance's own figure when the Migration has no totals yet."""
    if migration.get("status") == "completed":
        return 100
    total = migration.get("memory_total") or 0
    remaining = migration.get("memory_remaining")
    if total > 0 and remaining is not None:
        return max(0, min(99, int(100 * (total - remaining) / total)))
    progress = migration.get("progress")
    return int(progress) if isinstance(progress, int) else 0


def render_bar(migration: dict[str, Any], width: int = 30) -> str:
    done = percent(migration)
    filled = width * done // 100
    remaining = (migration.get("memory_remaining") or 0) // (1024 * 1024)
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done:3d}% "
        f"{migration.get('status', '?'):<14} {remaining} MiB left"
    )


class ProgressBar:
    """Redraws one line on a terminal; elsewhere (logs, CI) prints a line per visible change."""

    def __init__(self, stream: TextIO, prefix: str = "") -> None:
        self.stream = stream
        self.prefix = prefix
        self.tty = stream.isatty()
        self._last: tuple[str, int] | None = None

    def update(self, migration: dict[str, Any]) -> None:
        if self.tty:
            self.stream.write("\r" + self.prefix + render_bar(migration))
        else:
            key = (str(migration.get("status")), percent(migration) // 10)
            if key == self._last:
                return
            self._last = key
            self.stream.write(self.prefix + render_bar(migration) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def follow(
    s: Session, migration_uuid: str, timeout: float, *, bar: TextIO | None
) -> dict[str, Any]:
    """Poll the Migration until it ends, drawing a progress bar on ``bar`` if given."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    progress = ProgressBar(bar) if bar is not None else None
    while True:
        migration = await s.tasks.get_migration(s.ctxt, migration_uuid=migration_uuid)
        if progress is not None:
            progress.update(migration)
        if migration["status"] in FINAL:
            if progress is not None:
                progress.close()
            return migration
        if loop.time() > deadline:
            raise CommandError(
                f"migration {migration_uuid} still {migration['status']} after {timeout:g}s"
            )
        await asyncio.sleep(0.2)


async def failure_reason(s: Session, migration_uuid: str, instance_uuid: str) -> str:
    """Why a live migration did not complete: the instance fault recorded since it started
    (the conductor and the agents record one on every failure), else its status alone."""
    from conductor.tools.fleetctl.instances import latest_fault
    from shared_objects.objects.migration import Migration

    migration = await Migration.get_by_uuid(s.ctxt, migration_uuid)
    fault = await latest_fault(s, instance_uuid)
    started = migration.created_at
    if fault is not None and (
        started is None or fault.created_at is None or fault.created_at >= started
    ):
        return str(fault.message)
    return f"no fault recorded (status {migration.status})"


async def live_migrate(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from conductor.tools.fleetctl.instances import find_instance

    async with session(args, cfg) as s:
        uuid = (await find_instance(s, args.instance)).uuid
        migration_uuid = await s.tasks.live_migrate_instance(
            s.ctxt, instance_uuid=uuid, host=args.host, bandwidth_limit_mb_s=args.bandwidth_limit
        )
        if not args.wait:
            emit(args, {"migration_uuid": migration_uuid, "instance_uuid": uuid})
            return 0
        bar = sys.stderr if args.format == "table" else None
        final = await follow(s, migration_uuid, args.wait_timeout, bar=bar)
        reason = None
        if final["status"] != "completed":
            reason = await failure_reason(s, migration_uuid, uuid)
    emit(args, final)
    if reason is not None:
        print(
            f"fleetctl: live migration {migration_uuid} {final['status']}: {reason}",
            file=sys.stderr,
        )
        return 1
    return 0


async def migrations(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from conductor.tools.fleetctl.instances import find_instance

    async with session(args, cfg) as s:
        instance = (await find_instance(s, args.instance)).uuid if args.instance else None
        found = await s.tasks.list_migrations(s.ctxt, instance_uuid=instance)
    rows = [{**m, "progress": f"{percent(m)}%"} for m in found]
    emit(args, found if args.format in ("json", "yaml") else rows, LIST_COLUMNS)
    return 0


async def abort(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    uuid = args.migration_uuid
    async with session(args, cfg) as s:
        await s.tasks.live_migration_abort(s.ctxt, migration_uuid=uuid, reason=args.reason)
    message(args, f"abort requested for migration {uuid}", {"migration_uuid": uuid, "abort": True})
    return 0


async def force_complete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    uuid = args.migration_uuid
    async with session(args, cfg) as s:
        await s.tasks.live_migration_force_complete(s.ctxt, migration_uuid=uuid)
    message(
        args,
        f"force-complete requested for migration {uuid}",
        {"migration_uuid": uuid, "force_complete": True},
    )
    return 0


def register_commands(commands: Any) -> None:
    p = commands.add_parser("live-migrate", help="live-migrate an instance")
    p.add_argument("instance", type=name, help="instance UUID or name")
    p.add_argument("--host", type=name, help="destination (default: the scheduler picks)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow it with a progress bar; exit 1 (and the reason on stderr) unless completed",
    )
    p.add_argument(
        "--bandwidth-limit", type=positive_int, metavar="MB_S", help="cap the memory copy"
    )
    p.add_argument("--wait-timeout", type=seconds, default=600.0, metavar="SECONDS")
    p.set_defaults(func=live_migrate)

    p = commands.add_parser("migrations", help="list migrations")
    p.add_argument("--instance", type=name, help="only this instance's (UUID or name)")
    p.set_defaults(func=migrations)

    lm = commands.add_parser("live-migration", help="control a running live migration")
    sub = lm.add_subparsers(dest="lm_command", metavar="COMMAND", required=True)
    p = sub.add_parser("abort", help="stop it; the instance stays on its source")
    p.add_argument("migration_uuid", type=uuid_arg)
    p.add_argument("--reason", help="recorded with the cancellation")
    p.set_defaults(func=abort)
    p = sub.add_parser("force-complete", help="pause the guest so the copy converges")
    p.add_argument("migration_uuid", type=uuid_arg)
    p.set_defaults(func=force_complete)
