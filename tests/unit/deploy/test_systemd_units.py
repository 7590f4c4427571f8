"""deploy/systemd units: systemd's own checks plus the directives Fleet relies on.

``systemd-analyze verify`` exits 0 even on unknown keys and bad values (it only prints them),
so the test requires an empty stderr. It also insists that ``ExecStart`` names an existing
executable; the console scripts are not installed in /usr/local/bin on a test machine, so each
unit is checked as a copy in a temporary directory with ``ExecStart`` pointed at /bin/true.
Everything else in the copy is byte-for-byte the shipped unit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from shared_objects.runtime.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[3]
UNIT_DIR = ROOT / "deploy" / "systemd"
UNITS = {
    "fleet-conductor.service": "conductor",
    "fleet-compute-agent.service": "compute-agent",
}
# systemd-analyze security scores exposure 0 (locked down) .. 10 (unprotected).
MAX_EXPOSURE = 3.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (Debian package 'systemd'); unit checks need it",
)


def directives(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it is given, across sections (keys may repeat in units)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    values = d.get(key)
    assert values is not None, f"{key}= missing"
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"cannot read time span {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def runnable_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at /bin/true (see the module docstring)."""
    text = (UNIT_DIR / unit).read_text(encoding="utf-8")
    patched, count = re.subn(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    assert count == 1
    copy = tmp_path / unit
    copy.write_text(patched, encoding="utf-8")
    return copy


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


@needs_systemd_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_passes_systemd_analyze_verify_without_warnings(unit: str, tmp_path: Path) -> None:
    result = analyze("verify", str(runnable_copy(unit, tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_systemd_analyze
def test_verify_check_does_catch_unknown_keys(tmp_path: Path) -> None:
    # Guards the test above: exit status 0 but a warning on stderr is what a typo looks like.
    copy = runnable_copy("fleet-conductor.service", tmp_path)
    copy.write_text(copy.read_text().replace("PrivateTmp=yes", "PrivateTemp=yes"))
    result = analyze("verify", str(copy), cwd=tmp_path)
    assert result.returncode == 0
    assert "Unknown key 'PrivateTemp'" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_exposure_score_is_low(unit: str, tmp_path: Path) -> None:
    result = analyze("security", "--offline=true", str(runnable_copy(unit, tmp_path)), cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE


@pytest.mark.parametrize(("unit", "program"), sorted(UNITS.items()))
def test_unit_is_a_watched_notify_service_with_restart(unit: str, program: str) -> None:
    d = directives(UNIT_DIR / unit)
    assert one(d, "Type") == "notify"
    assert one(d, "NotifyAccess") == "main"
    assert seconds(one(d, "WatchdogSec")) == 30
    assert one(d, "Restart") == "on-failure"
    # Exit 2 is a configuration error (load_config_or_exit): restarting cannot fix it.
    assert one(d, "RestartPreventExitStatus") == "2"
    # systemd must wait longer than the service's own drain before it sends SIGKILL.
    assert seconds(one(d, "TimeoutStopSec")) > ServiceConfig().graceful_shutdown_timeout


@pytest.mark.parametrize(("unit", "program"), sorted(UNITS.items()))
def test_unit_runs_the_console_script_with_the_config_file(unit: str, program: str) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    d = directives(UNIT_DIR / unit)
    argv = one(d, "ExecStart").split()
    assert argv[0] == f"/usr/local/bin/{program}"
    assert program in scripts
    assert argv[1:] == ["--config", "/etc/fleet/fleet.toml"]
    assert one(d, "EnvironmentFile") == "-/etc/fleet/fleet.env"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_runs_as_the_dedicated_user_with_hardening(unit: str) -> None:
    d = directives(UNIT_DIR / unit)
    assert one(d, "User") == "fleet"
    assert "DynamicUser" not in d
    sysusers = (UNIT_DIR / "fleet.sysusers.conf").read_text()
    assert re.search(r"^u\s+fleet\s", sysusers, flags=re.M)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "StateDirectory": "fleet",
    }
    for key, value in expected.items():
        assert one(d, key) == value, key
    assert "@system-service" in d["SystemCallFilter"]


def test_agent_unit_carries_no_database_settings() -> None:
    text = (UNIT_DIR / "fleet-compute-agent.service").read_text()
    for line in text.splitlines():
        if not line.startswith("#"):
            assert "DATABASE" not in line.upper()
            assert "postgresql" not in line


# Secrets (URLs with passwords) come from systemd credentials, read through the *_file options.
CREDENTIALS = {
    "fleet-conductor.service": {
        "transport_url": ("messaging", "transport_url_file"),
        "database_url": ("database", "url_file"),
    },
    "fleet-compute-agent.service": {"transport_url": ("messaging", "transport_url_file")},
}


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_reads_its_urls_from_credentials(unit: str) -> None:
    from shared_objects.runtime.config import option_names

    d = directives(UNIT_DIR / unit)
    loaded = dict(value.split(":", 1) for value in d.get("LoadCredential", []))
    environment = dict(v.split("=", 1) for v in d.get("Environment", []))
    assert set(loaded) == set(CREDENTIALS[unit])
    for credential, (section, key) in CREDENTIALS[unit].items():
        assert loaded[credential] == f"/etc/fleet/credentials/{credential}"
        assert (section, key) in option_names()
        # %d is the service's $CREDENTIALS_DIRECTORY.
        assert environment[f"FLEET_{section.upper()}__{key.upper()}"] == f"%d/{credential}"
    # No secret in the unit itself.
    assert not [v for v in environment.values() if "://" in v]


def test_credential_files_feed_the_config_like_systemd_would(tmp_path: Path) -> None:
    from shared_objects.runtime.config import format_config, load_config

    d = directives(UNIT_DIR / "fleet-conductor.service")
    (tmp_path / "transport_url").write_text(
        "rabbit://fleet-conductor-1:s3/cr,et@broker:5672/fleet\n"
    )
    (tmp_path / "database_url").write_text("postgresql+asyncpg://fleet:s3@cret@db:5432/fleet\n")
    env = {
        k: v.replace("%d", str(tmp_path))
        for k, v in (item.split("=", 1) for item in d["Environment"])
        if k.startswith("FLEET_")
    }
    cfg = load_config({**env, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert cfg.messaging.transport_url.startswith("rabbit://fleet-conductor-1:s3/cr,et@")
    assert cfg.database.url.endswith("@db:5432/fleet")
    assert "s3" not in format_config(cfg)


@pytest.mark.parametrize(("unit", "program"), sorted(UNITS.items()))
def test_reload_sends_sighup_to_the_main_process(unit: str, program: str) -> None:
    # SIGHUP is what the service runner handles (shared_objects/runtime/service_runner.py); the
    # shell's kill builtin, as /bin/kill is not on every system (make test-deploy found it missing).
    assert one(directives(UNIT_DIR / unit), "ExecReload") == "/bin/sh -c 'kill -HUP \"$$MAINPID\"'"
