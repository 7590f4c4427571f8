"""The reconciler's test kit (``conductor.testing.reconcile``) on a fresh SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conductor.testing.reconcile import World, reconcile_world


@pytest.fixture
async def world(sqlite_database_url: str) -> AsyncIterator[World]:
    async with reconcile_world(sqlite_database_url) as made:
        yield made
