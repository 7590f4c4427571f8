"""Fixtures for object tests: an in-process conductor on a fresh SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conductor.testing import LocalConductor, local_conductor


@pytest.fixture
async def conductor(sqlite_database_url: str) -> AsyncIterator[LocalConductor]:
    """Agent-side objects (indirection installed) talking to a real conductor endpoint."""
    async with local_conductor(sqlite_database_url) as local:
        yield local
