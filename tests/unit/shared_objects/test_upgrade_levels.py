from __future__ import annotations

import dataclasses
import datetime

import pytest

from shared_objects import releases
from shared_objects.upgrade_levels import UnknownUpgradeLevel, compute_levels, parse_level

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


@dataclasses.dataclass
class FakeService:
    host: str
    version: int
    last_seen_up: datetime.datetime | None = NOW
    forced_down: bool = False

    def is_up_at(self, now: datetime.datetime, service_down_time: float) -> bool:
        if self.forced_down or self.last_seen_up is None:
            return False
        return (now - self.last_seen_up).total_seconds() <= service_down_time


OLDEST = releases.RELEASES[0]
NEWEST = releases.CURRENT


def test_auto_cap_is_the_oldest_live_release() -> None:
    services = [FakeService("a", OLDEST.service_version), FakeService("b", NEWEST.service_version)]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == OLDEST
    assert levels.release_for("a") == OLDEST
    assert levels.release_for("b") == NEWEST


def test_dead_services_do_not_hold_the_cap_down() -> None:
    stale = NOW - datetime.timedelta(seconds=300)
    services = [
        FakeService("old", OLDEST.service_version, last_seen_up=stale),
        FakeService("new", NEWEST.service_version),
    ]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == NEWEST
    # The dead host still gets objects it understands if anything is sent to it.
    assert levels.release_for("old") == OLDEST


def test_without_live_agents_the_cap_stays_at_the_oldest_supported_release() -> None:
    # An old agent registering right after this refresh must not be sent what it cannot read.
    levels = compute_levels([], now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == OLDEST
    assert levels.release_for("unknown") == OLDEST


def test_a_host_registered_after_the_refresh_gets_the_oldest_release() -> None:
    services = [FakeService("b", NEWEST.service_version)]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=None)
    assert levels.cap == NEWEST
    assert levels.release_for("newcomer") == OLDEST


def test_release_for_a_compute_rpc_api_version() -> None:
    assert releases.for_compute_rpc_api(OLDEST.compute_rpc_api) == OLDEST
    assert releases.for_compute_rpc_api(NEWEST.compute_rpc_api) == NEWEST


def test_pinned_level_overrides_auto() -> None:
    services = [FakeService("b", NEWEST.service_version)]
    levels = compute_levels(services, now=NOW, service_down_time=60, pinned=OLDEST)
    assert (levels.cap, levels.pinned) == (OLDEST, True)


def test_parse_level_accepts_auto_release_names_and_rpc_versions() -> None:
    assert parse_level("auto") is None
    assert parse_level(OLDEST.name) == OLDEST
    assert parse_level(NEWEST.compute_rpc_api).compute_rpc_api == NEWEST.compute_rpc_api
    with pytest.raises(UnknownUpgradeLevel, match="not a known release"):
        parse_level("9.9")
