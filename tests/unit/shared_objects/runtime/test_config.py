"""Configuration: precedence, validation messages, masking, the CLI helpers."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from shared_objects.runtime import config as config_mod
from shared_objects.runtime.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    format_config,
    load_config,
    load_config_or_exit,
    mask_url,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment() -> None:
    cfg = load_config({})
    assert cfg.messaging.transport_url == "rabbit://guest:guest@127.0.0.1:5672/"
    assert cfg.messaging.control_exchange == "fleet"
    assert cfg.database.url == "sqlite+aiosqlite:///fleet.db"
    assert cfg.service.report_interval == 10
    assert cfg.service.service_down_time == 60
    assert cfg.service.graceful_shutdown_timeout == 30
    assert cfg.service.metrics_host == "127.0.0.1"
    assert cfg.service.metrics_port == 0
    assert cfg.upgrade_levels.compute == "auto"
    assert (cfg.compute.cpu_allocation_ratio, cfg.compute.ram_allocation_ratio) == (16.0, 1.5)
    assert cfg.compute.disk_allocation_ratio == 1.0
    assert cfg.logging.format == "auto"
    assert cfg.host


def test_short_environment_aliases_set_their_options() -> None:
    cfg = load_config(
        {
            "FLEET_HOST": "compute-7",
            "FLEET_TRANSPORT_URL": "amqps://u:p@127.0.0.1:5671/fleet",
            "FLEET_CONTROL_EXCHANGE": "nova",
            "FLEET_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/fleet",
            "FLEET_LOG_FORMAT": "json",
            "FLEET_LOG_LEVEL": "debug",
            "FLEET_METRICS_PORT": "9464",
            "FLEET_COMPUTE_VERSION_CAP": "1.2",
        }
    )
    assert cfg.host == "compute-7"
    assert cfg.messaging.transport_url == "amqps://u:p@127.0.0.1:5671/fleet"
    assert cfg.messaging.control_exchange == "nova"
    assert cfg.database.url.endswith("/fleet")
    assert (cfg.logging.format, cfg.logging.level) == ("json", "debug")
    assert cfg.service.metrics_port == 9464
    assert cfg.upgrade_levels.compute == "1.2"


def test_generic_environment_names_convert_types() -> None:
    cfg = load_config(
        {
            "FLEET_MESSAGING__HEARTBEAT": "5",
            "FLEET_MESSAGING__RPC_RESPONSE_TIMEOUT": "2.5",
            "FLEET_MESSAGING__RABBIT_QUORUM_QUEUE": "yes",
            "FLEET_MESSAGING__PUBLISHER_CONFIRMS": "0",
            "FLEET_COMPUTE__VCPUS": "8",
            "FLEET_COMPUTE__FAILURES": "spawn=0.5",
        }
    )
    assert cfg.messaging.heartbeat == 5
    assert cfg.messaging.rpc_response_timeout == 2.5
    assert cfg.messaging.rabbit_quorum_queue is True
    assert cfg.messaging.publisher_confirms is False
    assert cfg.compute.vcpus == 8
    assert cfg.compute.failures == "spawn=0.5"


def test_file_is_read_and_environment_overrides_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
host = "from-file"
[messaging]
control_exchange = "file-exchange"
heartbeat = 7
rpc_response_timeout = 3
[service]
metrics_port = 9100
""",
    )
    cfg = load_config({"FLEET_CONFIG": str(path), "FLEET_HOST": "from-env"})
    assert cfg.host == "from-env"
    assert cfg.messaging.control_exchange == "file-exchange"
    assert cfg.messaging.heartbeat == 7
    # An integer in the file is accepted for a float option, and stored as a float.
    assert cfg.messaging.rpc_response_timeout == 3.0
    assert isinstance(cfg.messaging.rpc_response_timeout, float)
    assert cfg.service.metrics_port == 9100


def test_explicit_path_wins_over_fleet_config(tmp_path: Path) -> None:
    explicit = write(tmp_path, 'host = "explicit"\n')
    cfg = load_config({"FLEET_CONFIG": str(tmp_path / "missing.toml")}, path=explicit)
    assert cfg.host == "explicit"


def test_alias_wins_over_generic_name() -> None:
    env = {
        "FLEET_DATABASE__URL": "sqlite+aiosqlite:///a.db",
        "FLEET_DATABASE_URL": "sqlite+aiosqlite:///b.db",
    }
    cfg = load_config(env)
    assert cfg.database.url == "sqlite+aiosqlite:///b.db"


def test_transport_urls_the_runtime_accepts_are_accepted() -> None:
    for url in (
        "rabbit:///",
        "rabbits://u:p@127.0.0.1:5671/vh",
        "RABBIT://u:p@127.0.0.1/",
        "amqp://u:p@[::1]:5672/",
        "rabbit://a:b@h1:5672,c:d@h2:5673/fleet?ssl=1",
        "memory://host1@unit/",
    ):
        assert load_config({"FLEET_TRANSPORT_URL": url}).messaging.transport_url == url


def test_unrelated_fleet_variables_are_ignored() -> None:
    # FLEET_TEST_* and friends belong to other tools; only FLEET_<SECTION>__<KEY> is strict.
    cfg = load_config({"FLEET_TEST_TRANSPORT_URL": "whatever", "FLEET_CONFIG": ""})
    assert cfg.messaging.transport_url.startswith("rabbit://")


def test_state_dir_defaults_to_systemd_state_directory() -> None:
    assert load_config({"STATE_DIRECTORY": "/var/lib/fleet"}).compute.state_dir == "/var/lib/fleet"
    assert load_config({}).compute.state_dir == "fleet-state"
    explicit = load_config({"STATE_DIRECTORY": "/var/lib/fleet", "FLEET_STATE_DIR": "/srv/x"})
    assert explicit.compute.state_dir == "/srv/x"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLEET_MESSAGING__HEARTBEAT": "ten"}, "FLEET_MESSAGING__HEARTBEAT: expected an integer"),
        ({"FLEET_MESSAGING__RPC_RESPONSE_TIMEOUT": "nan"}, "expected a finite number"),
        ({"FLEET_MESSAGING__AMQP_DURABLE_QUEUES": "maybe"}, "expected a boolean"),
        ({"FLEET_NOPE__X": "1"}, "FLEET_NOPE__X: unknown section 'nope'"),
        ({"FLEET_MESSAGING__HEARTBEET": "1"}, "FLEET_MESSAGING__HEARTBEET: unknown option"),
        ({"FLEET_TRANSPORT_URL": "http://127.0.0.1/"}, "FLEET_TRANSPORT_URL: scheme must be"),
        ({"FLEET_TRANSPORT_URL": "127.0.0.1:5672"}, "FLEET_TRANSPORT_URL: is not a URL"),
        ({"FLEET_TRANSPORT_URL": "rabbit://u:p@:5672/"}, "FLEET_TRANSPORT_URL: has an empty host"),
        ({"FLEET_TRANSPORT_URL": "rabbit://h:port/"}, "FLEET_TRANSPORT_URL: has a bad host:port"),
        ({"FLEET_DATABASE_URL": "postgresql://u@h/db"}, "FLEET_DATABASE_URL: scheme must be"),
        ({"FLEET_DATABASE_URL": "postgresql+asyncpg://u@h/"}, "names no database"),
        ({"FLEET_METRICS_PORT": "65536"}, "FLEET_METRICS_PORT: must be a TCP port"),
        ({"FLEET_MESSAGING__MAX_CONCURRENCY": "0"}, "must be >= 1"),
        ({"FLEET_COMPUTE__CPU_ALLOCATION_RATIO": "0"}, "must be > 0"),
        ({"FLEET_LOG_FORMAT": "xml"}, "FLEET_LOG_FORMAT: must be one of auto, json, console"),
        ({"FLEET_COMPUTE_VERSION_CAP": "6.x"}, "FLEET_COMPUTE_VERSION_CAP: must be"),
        ({"FLEET_HOST": "  "}, "FLEET_HOST: must not be empty"),
        ({"FLEET_SERVICE__REPORT_INTERVAL": "90"}, "must be greater than report_interval"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[messaging]\nheartbeet = 1\n", "[messaging] heartbeet: unknown option"),
        ("[mesaging]\nheartbeat = 1\n", "unknown section or option 'mesaging'"),
        ("colour = 1\n", "unknown section or option 'colour'"),
        ("[messaging]\nheartbeat = '20'\n", "[messaging] heartbeat: expected an integer"),
        ("[messaging]\nheartbeat = true\n", "[messaging] heartbeat: expected an integer"),
        ("[messaging]\namqp_durable_queues = 1\n", "expected a boolean"),
        ("messaging = 3\n", "[messaging] must be a table"),
        ("[messaging\n", "invalid TOML"),
        (
            "[service]\nmetrics_port = -1\n",
            "fleet.toml: [service] metrics_port: must be a TCP port",
        ),
    ],
)
def test_bad_file_gives_one_line_naming_file_and_key(
    tmp_path: Path, body: str, message: str
) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config({}, path=path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*missing.toml: not found"):
        load_config({"FLEET_CONFIG": str(tmp_path / "missing.toml")})


def test_load_config_or_exit_prints_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        load_config_or_exit(environ={"FLEET_METRICS_PORT": "x"}, prog="conductor")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err == "conductor: configuration error: FLEET_METRICS_PORT: expected an integer, got 'x'\n"
    )


def test_mask_url_hides_every_password() -> None:
    assert mask_url("rabbit://a:s3cret@h1:5672,b:pw@h2:5673/vh") == (
        "rabbit://a:***@h1:5672,b:***@h2:5673/vh"
    )
    assert mask_url("rabbit://guest@127.0.0.1/") == "rabbit://guest@127.0.0.1/"
    assert mask_url("postgresql+asyncpg://u@h/db?password=x&ssl=1") == (
        "postgresql+asyncpg://u@h/db?password=***&ssl=1"
    )
    assert mask_url("memory://") == "memory://"


def test_format_config_masks_secrets_and_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "FLEET_HOST": 'odd"host',
            "FLEET_TRANSPORT_URL": "rabbit://fleet:hunter2@127.0.0.1:5672/",
            "FLEET_DATABASE_URL": "postgresql+asyncpg://fleet:pgpass@127.0.0.1:5432/fleet",
        }
    )
    text = format_config(cfg)
    assert "hunter2" not in text and "pgpass" not in text
    data = tomllib.loads(text)
    assert data["host"] == 'odd"host'
    assert data["messaging"]["transport_url"] == "rabbit://fleet:***@127.0.0.1:5672/"
    assert data["messaging"]["heartbeat"] == 20
    assert data["service"]["graceful_shutdown_timeout"] == 30.0
    # Every option is shown, so an operator sees the whole effective configuration.
    shown: set[tuple[str | None, str]] = {(None, "host")}
    shown |= {(s, k) for s, table in data.items() if isinstance(table, dict) for k in table}
    assert shown == set(config_mod.option_names())
    # The printed text is itself a usable config file (once real passwords are put back).
    again = load_config({}, path=write(tmp_path, text.replace("***", "x")))
    assert again.messaging.heartbeat == cfg.messaging.heartbeat


def test_cli_helpers_print_config_and_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="compute-agent")
    add_config_arguments(parser)
    path = write(tmp_path, 'host = "cli-host"\n')
    args = parser.parse_args(["--config", str(path), "--print-config"])
    with pytest.raises(SystemExit) as info:
        config_from_args(args, environ={})
    assert info.value.code == 0
    assert 'host = "cli-host"' in capsys.readouterr().out


def test_cli_helpers_return_config_without_print_flag(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="conductor")
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(write(tmp_path, 'host = "c1"\n'))])
    assert config_from_args(args, environ={}).host == "c1"


def test_compute_section_feeds_the_fake_driver_config() -> None:
    from compute_agent.virt import FakeDriverConfig

    cfg = load_config(
        {
            "FLEET_COMPUTE__VCPUS": "8",
            "FLEET_COMPUTE__DISK_GB": "100",
            "FLEET_COMPUTE__SPAWN_DELAY": "0",
            "FLEET_COMPUTE__FAILURES": "spawn:1",
            "FLEET_STATE_DIR": "/tmp/fleet-state-x",
        }
    )
    driver = FakeDriverConfig.from_mapping(cfg.compute.fake_driver_options())
    assert (driver.vcpus, driver.local_gb, driver.spawn_delay_s) == (8, 100, 0.0)
    assert driver.ram_allocation_ratio == 1.5
    assert driver.failures == "spawn:1"
    assert str(driver.state_dir) == "/tmp/fleet-state-x"
    assert driver.hypervisor_hostname is None


def test_version_cap_accepts_what_the_docs_show_and_refuses_unknown_levels() -> None:
    for level in ("auto", "1.0", "1.2", "1.1"):
        assert load_config({"FLEET_COMPUTE_VERSION_CAP": level}).upgrade_levels.compute == level
    with pytest.raises(ConfigError, match=r"FLEET_COMPUTE_VERSION_CAP.*got '6\.2'"):
        load_config({"FLEET_COMPUTE_VERSION_CAP": "6.2"})
