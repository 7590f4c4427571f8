"""Schema migrations (Alembic, configured in code) and the "schema is at head" check.

``fleetctl db upgrade`` is the only thing that migrates; the conductor only checks at start that
the schema is at the head revision and refuses to run otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from conductor.db.models import metadata
from conductor.db.session import create_engine
from shared_objects import exception

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
log = structlog.get_logger(__name__)


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration, built in code (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest revision shipped with this release."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None for an empty database)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current)
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the database at ``url`` to ``revision``; returns (before, after). Idempotent."""

    def run(connection: Connection) -> tuple[str | None, str | None]:
        before = _current(connection)
        command.upgrade(alembic_config(connection), revision)
        return before, _current(connection)

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(run)
    finally:
        await engine.dispose()


def known_revisions() -> set[str]:
    """Every revision this release ships."""
    script = ScriptDirectory.from_config(alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


async def check_at_head(url: str) -> str:
    """Raise ``SchemaNotAtHead`` unless the schema is at this release's head or newer.

    Migrations are expand-only (columns and tables are added, never dropped or renamed within a
    supported upgrade window), so during a rolling upgrade a conductor of the previous release
    keeps working on a schema the new release already migrated: a revision this release does
    not know is taken as newer (and logged), one it knows but is not head is too old.
    """
    current = await current_revision(url)
    head = head_revision()
    assert head is not None
    if current == head:
        return head
    if current is not None and current not in known_revisions():
        log.warning("schema_newer_than_release", current=current, head=head)
        return current
    raise exception.SchemaNotAtHead(current=current or "none (empty database)", head=head)


async def schema_drift(url: str) -> list[Any]:
    """Differences between the models and the migrated database (empty when in sync)."""

    def diff(connection: Connection) -> list[Any]:
        ctx = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(diff)
    finally:
        await engine.dispose()
