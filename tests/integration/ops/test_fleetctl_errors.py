"""``fleetctl`` when the environment is wrong, or the command line is: one line on stderr (no
traceback, no repr), the exit status docs/operations.md documents, nothing changed.

Each case runs the real command in a subprocess: a dead port on 127.0.0.1 for a broker or a
database that is down, a wrong password, a vhost that does not exist, a database or role that
does not exist, no conductor on the control exchange, a broken configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from shared_objects.testing.rabbit_node import free_port

pytestmark = pytest.mark.integration

AMQP_URL = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
PG_ADMIN_DSN = os.environ.get(
    "FLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
FLAVOR = ("flavor", "create", "x", "--vcpus", "1", "--ram", "64", "--disk", "1")


def fleetctl(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEET")}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "conductor.tools.fleetctl", *argv],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("fleetctl"), line
    assert "Traceback" not in line and " object at 0x" not in line and "<" not in line, line
    for word in words:
        assert word in line, line
    assert done.stdout == "", done.stdout
    return line


def _with_vhost(vhost: str, password: str | None = None, port: int | None = None) -> str:
    scheme, _, rest = AMQP_URL.partition("://")
    creds, _, hostpart = rest.rpartition("@")
    user, _, real_password = creds.partition(":")
    host = hostpart.split("/")[0]
    if port is not None:
        host = f"{host.rsplit(':', 1)[0]}:{port}"
    return f"{scheme}://{user}:{password or real_password}@{host}/{vhost}"


@pytest.mark.parametrize(
    "argv",
    [
        ("flavor", "create", "", "--vcpus", "1", "--ram", "64", "--disk", "1"),
        ("flavor", "create", "x", "--vcpus", "0", "--ram", "64", "--disk", "1"),
        ("flavor", "create", "x", "--vcpus", "abc", "--ram", "64", "--disk", "1"),
        ("flavor", "create", "x", "--vcpus", "1", "--ram", "64", "--disk", "-1"),
        ("boot", "--flavor", "small", "--name", "x", "--count", "0"),
        ("boot", "--flavor", "small", "--name", "  "),
        ("show", ""),
        ("--format", "xml", "list"),
        ("list", "--format", "xml"),
        ("--timeout", "0", "list"),
        ("live-migration", "abort", "not-a-uuid"),
        (
            "secgroup",
            "rule-add",
            "g",
            "--protocol",
            "tcp",
            "--from-port",
            "1",
            "--to-port",
            "70000",
        ),
        ("secgroup", "rule-add", "g", "--protocol", "tcp", "--from-port", "90", "--to-port", "80"),
        ("service", "disable", ""),
        ("flavor",),
        ("nonsense",),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: tuple[str, ...]) -> None:
    # A dead broker port: a usage error must be found before anything is sent.
    done = fleetctl(*argv, FLEET_TRANSPORT_URL=_with_vhost("", port=free_port()))
    assert_one_line(done, 2)


def test_vcpus_abc_names_the_option_not_a_function() -> None:
    done = fleetctl(*FLAVOR[:3], "--vcpus", "abc", "--ram", "1", "--disk", "1")
    line = assert_one_line(done, 2, "--vcpus", "'abc'")
    assert "positive_int" not in line


def test_broker_down(amqp_vhost: str) -> None:
    url = _with_vhost(amqp_vhost, port=free_port())
    line = assert_one_line(fleetctl(*FLAVOR, FLEET_TRANSPORT_URL=url), 3, "connection refused")
    assert "transport_url" in line
    # --debug: the same line, after the traceback.
    debug = fleetctl("--debug", *FLAVOR, FLEET_TRANSPORT_URL=url)
    assert debug.returncode == 3 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == line


def test_wrong_password(amqp_vhost: str) -> None:
    url = _with_vhost(amqp_vhost, password="wrong")
    line = assert_one_line(fleetctl(*FLAVOR, FLEET_TRANSPORT_URL=url), 3, "refused the login")
    assert "wrong" not in line  # the password is masked


def test_missing_vhost() -> None:
    url = _with_vhost(f"no-such-vhost-{uuid.uuid4().hex[:8]}")
    assert_one_line(fleetctl(*FLAVOR, FLEET_TRANSPORT_URL=url), 3, "vhost")


def test_no_conductor(amqp_vhost: str) -> None:
    exchange = f"fleet-test-{uuid.uuid4().hex[:12]}"
    done = fleetctl(
        "--timeout",
        "1",
        *FLAVOR,
        FLEET_TRANSPORT_URL=_with_vhost(amqp_vhost),
        FLEET_CONTROL_EXCHANGE=exchange,
    )
    assert_one_line(
        done, 4, "no conductor answered on topic 'conductor'", "is a conductor running?"
    )
    # The timeout also comes from the environment.
    done = fleetctl(
        "list",
        FLEET_TRANSPORT_URL=_with_vhost(amqp_vhost),
        FLEET_CONTROL_EXCHANGE=exchange,
        FLEETCTL_TIMEOUT="0.5",
    )
    assert_one_line(done, 4, "within 0.5s")


def test_bad_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text("[messaging]\nno_such_option = 1\n")
    assert_one_line(fleetctl("--config", str(bad), "list"), 2, "no_such_option")
    assert_one_line(fleetctl("list", FLEET_CONFIG=str(tmp_path / "missing.toml")), 2)
    assert_one_line(fleetctl("list", FLEET_TRANSPORT_URL="http://nope"), 2, "TRANSPORT_URL")
    assert_one_line(fleetctl("list", FLEETCTL_TIMEOUT="soon"), 2, "FLEETCTL_TIMEOUT")


async def _databases() -> set[str]:
    """Every database's name (other test runs add and drop theirs meanwhile)."""
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return {r["datname"] for r in await admin.fetch("SELECT datname FROM pg_database")}
    finally:
        await admin.close()


@pytest.mark.parametrize("verb", ["version", "upgrade"])
async def test_database_missing_unknown_role_refused(verb: str) -> None:
    missing = f"fleet_missing_{uuid.uuid4().hex[:8]}"
    cases = [
        (f"postgresql+asyncpg://postgres@127.0.0.1:5432/{missing}", "does not exist"),
        (f"postgresql+asyncpg://nobody_{uuid.uuid4().hex[:6]}@127.0.0.1:5432/test", "role"),
        (f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test", "connection refused"),
    ]
    for url, words in cases:
        done = fleetctl("db", verb, FLEET_DATABASE_URL=url)
        line = assert_one_line(done, 5, words, "[database] url")
        assert "sqlalche.me" not in line
    assert missing not in await _databases()
