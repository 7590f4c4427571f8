"""The conductor's start-up schema check: at head or newer passes, older or empty refuses."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conductor.db import migration
from conductor.db.session import create_engine
from shared_objects import exception


async def _set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision}
            )
    finally:
        await engine.dispose()


async def test_empty_database_is_refused_with_the_fix_in_the_message(
    sqlite_database_url: str,
) -> None:
    with pytest.raises(exception.SchemaNotAtHead, match="fleetctl db upgrade"):
        await migration.check_at_head(sqlite_database_url)


async def test_schema_at_head_passes(sqlite_database_url: str) -> None:
    await migration.upgrade(sqlite_database_url)
    assert await migration.check_at_head(sqlite_database_url) == migration.head_revision()


async def test_an_older_known_revision_is_refused(sqlite_database_url: str) -> None:
    await migration.upgrade(sqlite_database_url, "0001")
    with pytest.raises(exception.SchemaNotAtHead, match="0001"):
        await migration.check_at_head(sqlite_database_url)


async def test_a_newer_unknown_revision_is_accepted_during_a_rolling_upgrade(
    sqlite_database_url: str,
) -> None:
    # A newer release migrated the (expand-only) schema; this release's conductor keeps running.
    await migration.upgrade(sqlite_database_url)
    await _set_revision(sqlite_database_url, "9999")
    assert await migration.check_at_head(sqlite_database_url) == "9999"
