"""The pure copy model, and configuration from mappings and the agent's ``[compute]`` section."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_agent.virt import (
    CopyState,
    FakeDriver,
    FakeDriverConfig,
    InjectedFailure,
    InstanceNotFound,
    MigrationModel,
    NonConvergencePolicy,
    create_driver,
)
from compute_agent.virt.migration_model import MIB


def run_copy(model: MigrationModel, memory_mb: int, limit: int = 10_000) -> CopyState:
    state = CopyState.start(memory_mb)
    for _ in range(limit):
        state.step(model)
        if state.converged(model) or state.out_of_budget(model):
            break
    return state


def test_each_round_copies_bandwidth_and_redirties_dirty_rate() -> None:
    model = MigrationModel(bandwidth_mb_s=100, dirty_rate_mb_s=20, round_interval_s=1.0)
    state = CopyState.start(1000)
    state.step(model)
    assert state.memory_processed == 100 * MIB
    assert state.memory_remaining == (1000 - 100 + 20) * MIB
    assert state.rounds == 1 and state.simulated_s == 1.0


def test_dirty_pages_never_exceed_guest_memory() -> None:
    model = MigrationModel(bandwidth_mb_s=1, dirty_rate_mb_s=10_000, round_interval_s=1.0)
    state = CopyState.start(64)
    state.step(model)
    assert state.memory_remaining == 64 * MIB


def test_copy_converges_when_the_rest_fits_in_the_downtime() -> None:
    model = MigrationModel(bandwidth_mb_s=1000, dirty_rate_mb_s=100, max_downtime_s=0.05)
    state = run_copy(model, 4096)
    assert state.converged(model)
    assert state.memory_remaining <= model.downtime_threshold_bytes
    downtime = state.finish(model)
    assert 0 < downtime <= model.max_downtime_s
    assert state.memory_remaining == 0
    assert state.memory_processed > 4096 * MIB  # re-dirtied pages were sent again


def test_copy_faster_dirtying_than_bandwidth_stalls() -> None:
    model = MigrationModel(bandwidth_mb_s=100, dirty_rate_mb_s=150, stall_rounds=10)
    state = run_copy(model, 1024)
    assert not state.converged(model)
    assert state.out_of_budget(model)
    assert state.rounds_since_best == 10


def test_paused_guest_always_converges() -> None:
    model = MigrationModel(bandwidth_mb_s=100, dirty_rate_mb_s=150, stall_rounds=10_000)
    state = CopyState.start(1024)
    state.paused = True
    for _ in range(1000):
        state.step(model)
        if state.converged(model):
            break
    assert state.converged(model)


def test_model_parameters_parse_from_text() -> None:
    model = MigrationModel.parse("bandwidth_mb_s=50, dirty_rate_mb_s=5,max_rounds=7,policy=force")
    assert (model.bandwidth_mb_s, model.dirty_rate_mb_s, model.max_rounds) == (50.0, 5.0, 7)
    assert model.policy is NonConvergencePolicy.FORCE
    assert model.round_interval_s == MigrationModel().round_interval_s


@pytest.mark.parametrize(
    "text", ["bandwidth_mb_s", "speed=3", "bandwidth_mb_s=0", "policy=maybe", "max_rounds=0"]
)
def test_bad_model_parameters_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        MigrationModel.parse(text)


def test_config_from_the_compute_section() -> None:
    from shared_objects.runtime.config import load_config

    cfg = load_config(
        {
            "FLEET_STATE_DIR": "/var/lib/fleet/hv",
            "FLEET_COMPUTE__VCPUS": "4",
            "FLEET_COMPUTE__MEMORY_MB": "8192",
            "FLEET_COMPUTE__DISK_GB": "50",
            "FLEET_COMPUTE__RAM_ALLOCATION_RATIO": "1.5",
            "FLEET_COMPUTE__SPAWN_DELAY": "0",
            "FLEET_COMPUTE__MIGRATION": "time_scale=0,bandwidth_mb_s=250",
            "FLEET_COMPUTE__FAILURES": "spawn:1",
            "FLEET_COMPUTE__FAILURES_FILE": "/run/fleet/failures",
            "FLEET_COMPUTE__FSYNC": "yes",
        }
    )
    config = FakeDriverConfig.from_mapping(cfg.compute.fake_driver_options())
    assert config.state_dir == Path("/var/lib/fleet/hv")
    assert (config.vcpus, config.memory_mb, config.local_gb) == (4, 8192, 50)
    assert config.ram_allocation_ratio == 1.5
    assert config.spawn_delay_s == 0.0
    assert (config.migration.time_scale, config.migration.bandwidth_mb_s) == (0.0, 250.0)
    assert config.failures == "spawn:1"
    assert config.failures_file == Path("/run/fleet/failures")
    assert config.fsync is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"migration": "speed=3"}, "migration: unknown migration model parameter"),
        ({"failures": "explode:1"}, "failures: unknown failure injection step"),
    ],
)
def test_bad_driver_options_name_the_option(options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FakeDriverConfig.from_mapping(options)


def test_config_from_a_table_with_a_nested_migration_table() -> None:
    config = FakeDriverConfig.from_mapping(
        {"memory_mb": 1024, "migration": {"dirty_rate_mb_s": 0, "policy": "force"}}
    )
    assert config.memory_mb == 1024
    assert config.migration.dirty_rate_mb_s == 0.0
    assert config.migration.policy is NonConvergencePolicy.FORCE


@pytest.mark.parametrize(
    "values",
    [
        {"colour": "red"},
        {"vcpus": -1},
        {"spawn_delay_s": -1},
        {"fsync": "perhaps"},
        {"cpu_allocation_ratio": 0},
    ],
)
def test_bad_config_is_rejected(values: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FakeDriverConfig.from_mapping(values)


def test_virt_errors_carry_their_arguments_for_rpc() -> None:
    exc = InstanceNotFound(uuid="abc")
    assert str(exc) == "instance abc not found on this hypervisor"
    rebuilt = type(exc)(**exc.kwargs)
    assert str(rebuilt) == str(exc) and rebuilt.uuid == "abc"
    # the oslo.messaging failure format rebuilds with cls(*args, **kwargs)
    again = type(exc)(*exc.args, **exc.kwargs)
    assert str(again) == str(exc) and again.kwargs == {"uuid": "abc"}
    failure = InjectedFailure(step="spawn", uuid="u1")
    assert type(failure)(*failure.args, **failure.kwargs).step == "spawn"


def test_create_driver_applies_the_table(tmp_path: Path) -> None:
    driver = create_driver("fake", {"memory_mb": 1024, "vcpus": 2, "state_dir": str(tmp_path)})
    assert isinstance(driver, FakeDriver)
    assert (driver.config.memory_mb, driver.config.vcpus) == (1024, 2)
    assert driver.config.state_dir == tmp_path
    with pytest.raises(ValueError, match="unknown virt driver"):
        create_driver("libvirt")
