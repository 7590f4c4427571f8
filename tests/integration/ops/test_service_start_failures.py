"""``conductor`` and ``compute-agent`` meeting a broken environment at start, run as the real
commands: they retry for ``[service] start_retry_timeout`` (short here), then print ONE line on
stderr naming what to check (no traceback, no repr, no password) and exit with the documented
status: 3 for the environment, 2 for the configuration (shared_objects/runtime/startup_retry.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared_objects.testing.isolation import AMQP_URL

ROOT = Path(__file__).resolve().parents[3]
PASSWORD = "s3cret-not-shown"
pytestmark = pytest.mark.timeout(120)


def command(name: str) -> list[str]:
    """The console script installed beside this Python, else its module."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", name.replace("-", "_")]


def run(name: str, *args: str, env: dict[str, str], quiet: bool = True) -> tuple[int, str]:
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "PYTHONPATH": str(ROOT),
        "FLEET_SERVICE__START_RETRY_TIMEOUT": "1",
        "FLEET_CONTROL_EXCHANGE": f"fleet-test-{uuid.uuid4().hex[:12]}",
        **env,
    }
    if quiet:
        # Only what the process prints itself, not its log of each attempt.
        full["FLEET_LOG_LEVEL"] = "critical"
    done = subprocess.run(
        [*command(name), *args], env=full, capture_output=True, text=True, timeout=90
    )
    return done.returncode, done.stderr


def assert_one_line(stderr: str, prog: str, *expected: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"{prog}: "), line
    assert "Traceback" not in line and " object at 0x" not in line and "<" not in line
    assert PASSWORD not in line
    for text in expected:
        assert text in line, line


# An agent on the legacy shared login: the broker decides, not Fleet's identity check.
LEGACY = {"FLEET_SECURITY__LEGACY_SHARED_LOGIN": "guest", "FLEET_SECURITY__LEGACY_HOSTS": "c1"}


def broker_url(user: str, password: str, port: int = 5672, vhost: str = "") -> str:
    return f"rabbit://{user}:{password}@127.0.0.1:{port}/{vhost}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (broker_url("guest", PASSWORD, port=1), ["connection refused", "127.0.0.1:1"]),
        (broker_url("guest", PASSWORD), ["login refused", "password"]),
        (
            broker_url("guest", "guest", vhost=f"no-such-vhost-{uuid.uuid4().hex[:6]}"),
            ["virtual host", "no-such-vhost-"],
        ),
    ],
    ids=["broker-down", "wrong-password", "missing-vhost"],
)
def test_agent_broker_failures_are_one_line_and_exit_3(url: str, expected: list[str]) -> None:
    code, stderr = run("compute-agent", "--host", "c1", env={"FLEET_TRANSPORT_URL": url, **LEGACY})
    assert code == 3, stderr
    assert_one_line(stderr, "compute-agent", "cannot connect to the broker", *expected)


def test_agent_without_conductor_names_the_topic_and_logs_each_attempt(amqp_vhost: str) -> None:
    url = AMQP_URL.rstrip("/") + "/" + amqp_vhost
    code, stderr = run(
        "compute-agent",
        "--host",
        "c1",
        env={"FLEET_TRANSPORT_URL": url, "FLEET_SERVICE__START_RETRY_TIMEOUT": "3", **LEGACY},
        quiet=False,
    )
    assert code == 3, stderr
    assert "Traceback" not in stderr
    assert '"waiting_for": "conductor"' in stderr or "waiting_for=conductor" in stderr
    *_, last = stderr.splitlines()
    assert last.startswith("compute-agent: no conductor answered on topic 'conductor'"), last
    assert "is a conductor running" in last


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql+asyncpg://root:{PASSWORD}@127.0.0.1:1/test", ["connection refused"]),
        (
            f"postgresql+asyncpg://root@127.0.0.1:5432/fleet_missing_{uuid.uuid4().hex[:8]}",
            ["does not exist", "fleet_missing_"],
        ),
        (
            f"postgresql+asyncpg://fleet_nobody_{uuid.uuid4().hex[:6]}@127.0.0.1:5432/test",
            ["role", "does not exist", "user name"],
        ),
    ],
    ids=["database-refused", "database-missing", "unknown-role"],
)
def test_conductor_database_failures_are_one_line_and_exit_3(url: str, expected: list[str]) -> None:
    code, stderr = run(
        "conductor",
        env={"FLEET_DATABASE_URL": url, "FLEET_SECURITY__CONDUCTOR_LOGINS": "guest"},
    )
    assert code == 3, stderr
    assert_one_line(stderr, "conductor", "cannot open the database", *expected)


@pytest.mark.parametrize("prog", ["conductor", "compute-agent"])
def test_a_configuration_error_is_one_line_and_exit_2(prog: str) -> None:
    code, stderr = run(prog, env={"FLEET_COMPUTE_VERSION_CAP": "6.2"})
    assert code == 2, stderr
    assert_one_line(stderr, prog, "configuration error", "FLEET_COMPUTE_VERSION_CAP", "6.2")


@pytest.mark.parametrize("prog", ["conductor", "compute-agent"])
def test_version_is_the_package_version(prog: str) -> None:
    from shared_objects.version import VERSION

    done = subprocess.run(
        [*command(prog), "--version"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith(f"{prog} {VERSION} (release ")


def test_print_config_shows_the_host_given_on_the_command_line() -> None:
    done = subprocess.run(
        [*command("compute-agent"), "--host", "c1", "--print-config"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "FLEET_HOST": "from-env"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == 'host = "c1"'


def test_debug_shows_the_traceback_instead_of_one_line() -> None:
    code, stderr = run(
        "compute-agent",
        "--host",
        "c1",
        "--debug",
        env={"FLEET_TRANSPORT_URL": broker_url("guest", PASSWORD, port=1), **LEGACY},
    )
    assert code == 1, stderr
    assert "Traceback" in stderr and "StartupFailed" in stderr
    assert PASSWORD not in stderr


def test_sigterm_while_waiting_at_start_stops_at_once() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "PYTHONPATH": str(ROOT),
        "FLEET_SERVICE__START_RETRY_TIMEOUT": "60",
        "FLEET_TRANSPORT_URL": broker_url("guest", PASSWORD, port=1),
        **LEGACY,
    }
    proc = subprocess.Popen(
        [*command("compute-agent"), "--host", "c1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until it is retrying (its first attempt is logged), then stop it.
        assert proc.stderr is not None
        for line in proc.stderr:
            if "waiting_at_start" in line:
                break
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        proc.kill()
        proc.wait()
    assert code == 0
