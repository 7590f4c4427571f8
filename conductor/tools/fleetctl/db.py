"""``fleetctl db``: schema migrations (the only way the schema changes)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared_objects.runtime.config import FleetConfig

NAME = "db"
HELP = "database schema: upgrade, version"


async def upgrade(args: argparse.Namespace, cfg: FleetConfig) -> int:
    """Migrate to the head revision; running it again is a no-op."""
    from conductor.db import migration

    before, after = await migration.upgrade(cfg.database.url)
    if before == after:
        print(f"database already at {after}")
    else:
        print(f"database upgraded from {before or 'empty'} to {after}")
    return 0


async def version(args: argparse.Namespace, cfg: FleetConfig) -> int:
    """Print the current and head revisions; exit 1 when not at head."""
    from conductor.db import migration

    current = await migration.current_revision(cfg.database.url)
    head = migration.head_revision()
    print(f"current: {current or 'empty'}\nhead: {head}")
    return 0 if current == head else 1


def register(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "upgrade", help="migrate the schema to this release (idempotent)"
    ).set_defaults(func=upgrade)
    commands.add_parser("version", help="show current and head schema revisions").set_defaults(
        func=version
    )
