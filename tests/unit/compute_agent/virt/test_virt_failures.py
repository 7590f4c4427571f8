"""Failure injection: every step can fail, a failure changes nothing, config and hook agree."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from virt_testlib import MakeDriver, spec

from compute_agent.virt import (
    STEPS,
    FakeDriver,
    FakeDriverConfig,
    InjectedFailure,
    VirtError,
    parse_failure_spec,
)

RULES = [{"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "0.0.0.0/0"}]
NEW_RULES = [{"protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "10.0.0.0/8"}]
VM = spec("vm1", memory_mb=256)


@dataclass
class World:
    source: FakeDriver
    dest: FakeDriver
    migrate_data: dict[str, Any]

    async def snapshot(self) -> Any:
        """Everything observable on both hosts."""
        result = []
        for driver in (self.source, self.dest):
            for info in sorted(await driver.list_guests(), key=lambda i: i.uuid):
                rules = await driver.get_firewall_rules(info.uuid)
                result.append((driver.host, info, rules))
        return result


async def build_world(make_driver: MakeDriver, stage: str) -> World:
    source = await make_driver("src")
    dest = await make_driver("dst")
    await source.spawn(VM, "img", [{"volume_id": "vol1", "mountpoint": "/dev/vdb"}], RULES)
    world = World(source, dest, {})
    if stage == "stopped":
        await source.power_off(VM)
    if stage in ("prepared", "switched"):
        dest_data = await dest.check_can_live_migrate_destination(VM, "src")
        world.migrate_data = await source.check_can_live_migrate_source(VM, dest_data)
        await dest.pre_live_migration(VM, world.migrate_data)
    if stage == "switched":
        await source.live_migration(VM, "dst", world.migrate_data)
    return world


Call = Callable[[World], Awaitable[Any]]

#: step -> (world stage it needs, driver whose injector fires, the call that runs the step)
SCENARIOS: dict[str, tuple[str, str, Call]] = {
    "spawn": ("base", "source", lambda w: w.source.spawn(spec("vm2"), "img")),
    "destroy": ("base", "source", lambda w: w.source.destroy(VM)),
    "power_off": ("base", "source", lambda w: w.source.power_off(VM)),
    "power_on": ("stopped", "source", lambda w: w.source.power_on(VM)),
    "attach_volume": ("base", "source", lambda w: w.source.attach_volume(VM, "vol2", "/dev/vdc")),
    "detach_volume": ("base", "source", lambda w: w.source.detach_volume(VM, "vol1")),
    "refresh_instance_security_rules": (
        "base",
        "source",
        lambda w: w.source.refresh_instance_security_rules(VM, NEW_RULES),
    ),
    "unfilter_instance": ("base", "source", lambda w: w.source.unfilter_instance(VM)),
    "check_can_live_migrate_destination": (
        "base",
        "dest",
        lambda w: w.dest.check_can_live_migrate_destination(VM, "src"),
    ),
    "check_can_live_migrate_source": (
        "base",
        "source",
        lambda w: w.source.check_can_live_migrate_source(VM, {"dest_host": "dst"}),
    ),
    "pre_live_migration": (
        "base",
        "dest",
        lambda w: w.dest.pre_live_migration(VM, {"source_host": "src", "volumes": {}}),
    ),
    "live_migration": (
        "prepared",
        "source",
        lambda w: w.source.live_migration(VM, "dst", w.migrate_data),
    ),
    "live_migration_copy": (
        "prepared",
        "source",
        lambda w: w.source.live_migration(VM, "dst", w.migrate_data),
    ),
    "post_live_migration": ("switched", "source", lambda w: w.source.post_live_migration(VM)),
    "post_live_migration_at_destination": (
        "prepared",
        "dest",
        lambda w: w.dest.post_live_migration_at_destination(VM),
    ),
    "rollback_live_migration_at_destination": (
        "prepared",
        "dest",
        lambda w: w.dest.rollback_live_migration_at_destination(VM),
    ),
    "rollback_live_migration_at_source": (
        "switched",
        "source",
        lambda w: w.source.rollback_live_migration_at_source(VM),
    ),
}


def test_every_step_except_init_host_has_a_scenario() -> None:
    assert set(SCENARIOS) == STEPS - {"init_host"}


@pytest.mark.parametrize("step", sorted(SCENARIOS))
async def test_injected_failure_fires_once_and_changes_nothing(
    make_driver: MakeDriver, step: str
) -> None:
    stage, side, call = SCENARIOS[step]
    world = await build_world(make_driver, stage)
    driver = world.source if side == "source" else world.dest
    before = await world.snapshot()
    driver.failures.inject(step, count=1)

    with pytest.raises(InjectedFailure) as err:
        await call(world)

    assert err.value.step == step
    assert await world.snapshot() == before
    assert driver.failures.history == [(step, "vm2" if step == "spawn" else "vm1")]
    await call(world)  # count=1 is used up: the step now succeeds
    if not step.startswith("check_can"):  # the checks change nothing even when they succeed
        assert await world.snapshot() != before


async def test_init_host_failure_can_be_configured_and_retried(state_dir: Any) -> None:
    driver = FakeDriver(FakeDriverConfig(state_dir=state_dir, failures="init_host:1"))
    with pytest.raises(InjectedFailure):
        await driver.init_host("h")
    await driver.init_host("h")
    assert driver.host == "h"


async def test_count_and_uuid_limit_where_a_failure_fires(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    driver.failures.inject("spawn", count=2, uuid="bad")
    await driver.spawn(spec("good"), "img")
    for _ in range(2):
        with pytest.raises(InjectedFailure):
            await driver.spawn(spec("bad"), "img")
    await driver.spawn(spec("bad"), "img")
    assert sorted(await driver.list_instance_uuids()) == ["bad", "good"]
    assert driver.failures.history == [("spawn", "bad"), ("spawn", "bad")]
    assert driver.failures.pending() == []


async def test_count_none_fails_every_time_until_cleared(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    driver.failures.inject("destroy", count=None)
    await driver.spawn(spec("i1"), "img")
    for _ in range(3):
        with pytest.raises(InjectedFailure):
            await driver.destroy(spec("i1"))
    driver.failures.clear("destroy")
    await driver.destroy(spec("i1"))
    assert await driver.list_instance_uuids() == []


class DiskOnFire(VirtError):
    msg_fmt = "disk on fire"


async def test_custom_exception_class_instance_or_factory_is_raised(
    make_driver: MakeDriver,
) -> None:
    driver = await make_driver()
    driver.failures.inject("spawn", exc=DiskOnFire)
    with pytest.raises(DiskOnFire):
        await driver.spawn(spec("i1"), "img")
    driver.failures.inject("spawn", exc=OSError("no space"))
    with pytest.raises(OSError, match="no space"):
        await driver.spawn(spec("i1"), "img")
    driver.failures.inject("spawn", exc=lambda step, uuid: TimeoutError(f"{step}/{uuid}"))
    with pytest.raises(TimeoutError, match="spawn/i1"):
        await driver.spawn(spec("i1"), "img")
    assert await driver.list_instance_uuids() == []


async def test_delay_slows_a_step_without_failing_it(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    driver.failures.delay("spawn", 0.15, count=1)
    started = time.monotonic()
    await driver.spawn(spec("i1"), "img")
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    await driver.spawn(spec("i2"), "img")
    assert time.monotonic() - started < 0.1


async def test_failures_from_the_compute_section_reach_the_driver(state_dir: Any) -> None:
    from shared_objects.runtime.config import load_config

    cfg = load_config(
        {
            "FLEET_COMPUTE__FAILURES": "spawn:1, pre_live_migration:*",
            "FLEET_COMPUTE__SPAWN_DELAY": "0",
            "FLEET_STATE_DIR": str(state_dir),
        }
    )
    config = FakeDriverConfig.from_mapping(cfg.compute.fake_driver_options())
    driver = FakeDriver(config)
    await driver.init_host("env-host")
    with pytest.raises(InjectedFailure):
        await driver.spawn(spec("i1"), "img")
    await driver.spawn(spec("i1"), "img")
    for _ in range(2):
        with pytest.raises(InjectedFailure):
            await driver.pre_live_migration(spec("i2"), {"source_host": "x"})


def test_failure_spec_syntax() -> None:
    rules = parse_failure_spec(
        "spawn, destroy:3, pre_live_migration:*,live_migration_copy:1:after=3,"
        "attach_volume:2:uuid=abc,spawn:1:delay=0.5"
    )
    summary = [(r.step, r.remaining, r.uuid, r.after_rounds, r.delay_s, r.fail) for r in rules]
    assert summary == [
        ("spawn", 1, None, 0, 0.0, True),
        ("destroy", 3, None, 0, 0.0, True),
        ("pre_live_migration", None, None, 0, 0.0, True),
        ("live_migration_copy", 1, None, 3, 0.0, True),
        ("attach_volume", 2, "abc", 0, 0.0, True),
        ("spawn", 1, None, 0, 0.5, False),
    ]
    assert parse_failure_spec("") == []


@pytest.mark.parametrize(
    "bad",
    ["spwan:1", "spawn:0", "spawn:x", "spawn:1:colour=red", "spawn:1:after", "spawn:1:after=z"],
)
def test_bad_failure_specs_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_failure_spec(bad)


async def test_after_rounds_is_only_for_the_copy_step(make_driver: MakeDriver) -> None:
    driver = await make_driver()
    with pytest.raises(ValueError):
        driver.failures.inject("spawn", after_rounds=2)
    with pytest.raises(ValueError):
        driver.failures.load_spec("spawn:1:after=2")
    with pytest.raises(ValueError):
        driver.failures.inject("no_such_step")


def write_spec(path: Path, text: str) -> None:
    """Rewrite the failures file atomically, as a test driving a subprocess agent would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_failures_file_changes_apply_to_a_running_driver(
    make_driver: MakeDriver, tmp_path: Path
) -> None:
    control = tmp_path / "failures.spec"
    driver = await make_driver(failures_file=control)
    await driver.spawn(spec("before"), "img")  # no file yet: nothing injected

    write_spec(control, "spawn:*")
    for _ in range(2):
        with pytest.raises(InjectedFailure):
            await driver.spawn(spec("x"), "img")

    write_spec(control, "destroy:1:uuid=before")
    await driver.spawn(spec("x"), "img")  # the spawn rule was replaced
    with pytest.raises(InjectedFailure):
        await driver.destroy(spec("before"))

    write_spec(control, "spwan:1")  # a typo keeps the previous rules instead of crashing
    await driver.destroy(spec("before"))  # the count-1 rule was used up above

    write_spec(control, "spawn:1")
    control.unlink()  # deleting the file clears its rules
    await driver.spawn(spec("y"), "img")
    assert sorted(await driver.list_instance_uuids()) == ["x", "y"]


async def test_failures_file_rules_do_not_replace_hook_rules(
    make_driver: MakeDriver, tmp_path: Path
) -> None:
    control = tmp_path / "failures.spec"
    write_spec(control, "destroy:1")
    driver = await make_driver(failures_file=control)
    driver.failures.inject("spawn", count=1)
    write_spec(control, "")
    with pytest.raises(InjectedFailure):
        await driver.spawn(spec("x"), "img")
