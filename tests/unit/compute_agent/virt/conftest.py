"""Fixtures for the virt tests: fake hypervisors on a per-test state directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from virt_testlib import FAST, MakeDriver

from compute_agent.virt import FakeDriver, FakeDriverConfig


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "hv"


@pytest.fixture
async def make_driver(state_dir: Path) -> AsyncIterator[MakeDriver]:
    """Build and init a FakeDriver for a host; options override FakeDriverConfig fields."""
    made: list[FakeDriver] = []

    async def _make(host: str = "host-a", **options: Any) -> FakeDriver:
        options.setdefault("state_dir", state_dir)
        options.setdefault("spawn_delay_s", 0.0)
        options.setdefault("migration", FAST)
        driver = FakeDriver(FakeDriverConfig(**options))
        await driver.init_host(host)
        made.append(driver)
        return driver

    yield _make
    for driver in made:
        await driver.cleanup_host()
