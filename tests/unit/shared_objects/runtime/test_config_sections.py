"""The sections that used to have readers of their own: ``[live_migration]`` (both services),
the fake hypervisor's ``[compute]`` options, ``[logging] trace_object_versions``. Each follows
the rules of every other section: TOML, then ``FLEET_<SECTION>__<KEY>``, validated at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from shared_objects.runtime.config import ConfigError, LiveMigrationConfig, load_config

ROOT = Path(__file__).resolve().parents[4]


def test_live_migration_section_defaults() -> None:
    section = load_config({}).live_migration
    assert section == LiveMigrationConfig()
    assert (section.call_monitor_timeout, section.rpc_timeout) == (10.0, 30.0)
    assert (section.max_attempts, section.max_concurrent, section.max_in_flight) == (3, 16, 32)
    assert section.long_call_timeout == section.migration_timeout == 6 * 3600.0


def test_live_migration_section_from_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        "[live_migration]\ncall_monitor_timeout = 4\nmax_attempts = 2\norphan_after = 60\n",
        encoding="utf-8",
    )
    cfg = load_config({"FLEET_LIVE_MIGRATION__MAX_ATTEMPTS": "5"}, path=path)
    section = cfg.live_migration
    assert (section.call_monitor_timeout, section.max_attempts) == (4.0, 5)
    assert section.orphan_after == 60.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FLEET_LIVE_MIGRATION__CALL_MONITOR_TIMEOUT": "1"},
            "FLEET_LIVE_MIGRATION__CALL_MONITOR_TIMEOUT: must be >= 2",
        ),
        ({"FLEET_LIVE_MIGRATION__MAX_CONCURRENT": "0"}, "MAX_CONCURRENT: must be >= 1"),
        ({"FLEET_LIVE_MIGRATION__RPC_TIMEOUT": "0"}, "RPC_TIMEOUT: must be > 0"),
        ({"FLEET_LIVE_MIGRATION__MAX_IN_FLIGHT": "many"}, "expected an integer, got 'many'"),
        ({"FLEET_LIVE_MIGRATION__PROGRESS_INTERVAL": "-1"}, "must be >= 0"),
        ({"FLEET_LIVE_MIGRATION__TIMEOUT": "5"}, "FLEET_LIVE_MIGRATION__TIMEOUT: unknown option"),
        ({"FLEET_LOGGING__TRACE_OBJECT_VERSIONS": "perhaps"}, "expected a boolean"),
        ({"FLEET_TRACE_OBJECT_VERSIONS": "2"}, "FLEET_TRACE_OBJECT_VERSIONS: expected a boolean"),
    ],
)
def test_bad_values_of_the_new_sections_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_value_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("[live_migration]\nmax_attempts = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"fleet.toml: \[live_migration\] max_attempts: must"):
        load_config({}, path=path)


@pytest.mark.parametrize(
    ("var", "replacement"),
    [
        ("FLEET_LIVE_MIGRATION_CALL_MONITOR_TIMEOUT", "FLEET_LIVE_MIGRATION__CALL_MONITOR_TIMEOUT"),
        ("FLEET_LIVE_MIGRATE_MAX_ATTEMPTS", "FLEET_LIVE_MIGRATION__MAX_ATTEMPTS"),
        ("FLEET_LIVE_MIGRATE_SERVICE_DOWN_TIME", "FLEET_SERVICE__SERVICE_DOWN_TIME"),
        ("FLEET_FAKE_FAILURES", "FLEET_COMPUTE__FAILURES"),
        ("FLEET_FAKE_FAILURES_FILE", "FLEET_COMPUTE__FAILURES_FILE"),
        ("FLEET_FAKE_RAM_RATIO", "FLEET_COMPUTE__RAM_ALLOCATION_RATIO"),
    ],
)
def test_retired_variables_are_refused_with_their_replacement(var: str, replacement: str) -> None:
    # Silently ignoring a setting an operator made would be worse than refusing to start.
    with pytest.raises(ConfigError) as info:
        load_config({var: "1"})
    assert str(info.value).startswith(f"{var}: no longer read")
    assert replacement in str(info.value)


def test_a_retired_variable_beside_its_replacement_is_ignored() -> None:
    # One environment for two releases during a rolling upgrade: the old name for the older
    # agents, the new one for these.
    cfg = load_config(
        {"FLEET_FAKE_FAILURES": "spawn:1", "FLEET_COMPUTE__FAILURES": "pre_live_migration:*"}
    )
    assert cfg.compute.failures == "pre_live_migration:*"


def test_trace_object_versions_short_name_and_option() -> None:
    assert load_config({}).logging.trace_object_versions is False
    assert load_config({"FLEET_TRACE_OBJECT_VERSIONS": "1"}).logging.trace_object_versions
    env = {"FLEET_LOGGING__TRACE_OBJECT_VERSIONS": "true"}
    assert load_config(env).logging.trace_object_versions


async def test_service_logging_turns_the_object_version_trace_on_and_off() -> None:
    import io

    from shared_objects.objects.flavor import Flavor
    from shared_objects.runtime.log import configure_service_logging
    from shared_objects.serializer import FleetObjectSerializer

    primitive = Flavor(name="small", flavorid="1", vcpus=1, memory_mb=512, root_gb=1)
    primitive = primitive.obj_to_primitive()
    serializer = FleetObjectSerializer()
    try:
        for enabled in (True, False):
            cfg = load_config({"FLEET_TRACE_OBJECT_VERSIONS": "1" if enabled else "0"})
            configure_service_logging(cfg, "compute-agent", stream=io.StringIO())
            with capture_logs() as logs:
                await serializer.deserialize_entity(None, primitive)
            traced = [e for e in logs if e["event"] == "object_received"]
            assert len(traced) == (1 if enabled else 0)
            if enabled:
                assert (traced[0]["object"], traced[0]["version"]) == ("Flavor", Flavor.VERSION)
    finally:
        configure_service_logging(load_config({}), "tests", stream=io.StringIO())


def test_agent_refuses_a_bad_fake_hypervisor_option() -> None:
    from compute_agent.service import make_driver

    cfg = load_config({"FLEET_COMPUTE__MIGRATION": "speed=3"})
    with pytest.raises(ConfigError, match=r"^\[compute\] migration: unknown migration model"):
        make_driver(cfg)
    cfg = load_config({"FLEET_COMPUTE__FAILURES": "spawn:never"})
    with pytest.raises(ConfigError, match=r"^\[compute\] failures: bad count"):
        make_driver(cfg)


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("FLEET_COMPUTE__FAILURES", "explode", "[compute] failures: unknown failure injection"),
        ("FLEET_LIVE_MIGRATION__MAX_CONCURRENT", "0", "FLEET_LIVE_MIGRATION__MAX_CONCURRENT:"),
    ],
)
def test_agent_exits_2_with_one_line_on_a_bad_option(var: str, value: str, message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "FLEET_HOST": "bad-config",
            "FLEET_TRANSPORT_URL": "memory://bad-config@unit/",
            "FLEET_STATE_DIR": "/nonexistent/fleet-state",
            var: value,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "compute_agent"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("compute-agent: configuration error: ")
    assert message in line
