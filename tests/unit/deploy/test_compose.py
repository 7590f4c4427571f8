"""docker-compose.yml and deploy/Dockerfile: compose-spec schema plus Fleet's own rules.

The schema (vendored by the check-jsonschema package) catches unknown keys and bad values; it
does not know which services exist or what Fleet needs, so the project checks below do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import check_jsonschema
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SCHEMA = Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
FLEET_IMAGE = "fleet:latest"
# Services that must reach the database; every other Fleet service must not get its URL.
DATABASE_USERS = {"conductor", "migrate"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(project["project"]["scripts"])


def fleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == FLEET_IMAGE}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_file_is_valid_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_check_would_catch_a_typo(compose: dict[str, Any]) -> None:
    # Guards the test above: a misspelt key must make the schema fail.
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = json.loads(json.dumps(compose))
    broken["services"]["conductor"]["depends_onn"] = {}
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


def test_the_expected_services_are_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "rabbitmq",
        "postgres",
        "migrate",
        "conductor",
        "compute-1",
        "compute-2",
    }
    assert compose["services"]["conductor"]["deploy"]["replicas"] == 2


def test_every_referenced_service_and_volume_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dep in depends if isinstance(depends, list) else depends.keys():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount["source"]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts undeclared volume {source!r}"


def test_start_order_waits_for_health_and_for_the_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def condition(name: str, dep: str) -> str:
        return str(services[name]["depends_on"][dep]["condition"])

    assert condition("migrate", "postgres") == "service_healthy"
    assert condition("conductor", "rabbitmq") == "service_healthy"
    assert condition("conductor", "postgres") == "service_healthy"
    assert condition("conductor", "migrate") == "service_completed_successfully"
    for agent in ("compute-1", "compute-2"):
        assert condition(agent, "rabbitmq") == "service_healthy"
        assert condition(agent, "conductor") == "service_healthy"
    # A service_healthy condition is only meaningful if the target has a healthcheck.
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep} without healthcheck"


def test_broker_and_database_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3-management")
    assert services["rabbitmq"]["healthcheck"]["test"] == [
        "CMD",
        "rabbitmq-diagnostics",
        "-q",
        "ping",
    ]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert any(
        str(v).endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"]
    )


def test_each_fleet_service_gets_the_environment_it_needs(compose: dict[str, Any]) -> None:
    services = fleet_services(compose)
    assert set(services) == {"migrate", "conductor", "compute-1", "compute-2"}
    rabbit_env = environment(compose["services"]["rabbitmq"])
    pg_env = environment(compose["services"]["postgres"])
    for name, service in services.items():
        env = environment(service)
        transport = urlsplit(env["FLEET_TRANSPORT_URL"])
        assert transport.scheme == "rabbit"
        assert transport.hostname == "rabbitmq"
        assert (transport.username, transport.password) == (
            rabbit_env["RABBITMQ_DEFAULT_USER"],
            rabbit_env["RABBITMQ_DEFAULT_PASS"],
        ), name
        if name in DATABASE_USERS:
            db = urlsplit(env["FLEET_DATABASE_URL"])
            assert db.scheme == "postgresql+asyncpg"
            assert db.hostname == "postgres"
            assert (db.username, db.password, db.path.lstrip("/")) == (
                pg_env["POSTGRES_USER"],
                pg_env["POSTGRES_PASSWORD"],
                pg_env["POSTGRES_DB"],
            ), name
        else:
            # Agents never hold database credentials (DESIGN.md section 1).
            assert not any("DATABASE" in key for key in env), name


def test_fleet_environment_is_accepted_by_the_config_loader(compose: dict[str, Any]) -> None:
    from shared_objects.config import load_config

    for name, service in fleet_services(compose).items():
        cfg = load_config(environment(service))
        assert cfg.messaging.transport_url.startswith("rabbit://"), name


def test_agents_have_distinct_host_names_and_their_own_state_volume(
    compose: dict[str, Any],
) -> None:
    hosts, volumes = set(), set()
    for name in ("compute-1", "compute-2"):
        service = compose["services"][name]
        env = environment(service)
        assert env["FLEET_HOST"] == name
        hosts.add(env["FLEET_HOST"])
        [mount] = service["volumes"]
        source, target = mount.split(":")[:2]
        assert target == env["FLEET_STATE_DIR"]
        volumes.add(source)
    assert len(hosts) == len(volumes) == 2
    # Two conductor replicas must not share one host name.
    assert "FLEET_HOST" not in environment(compose["services"]["conductor"])


def test_commands_are_declared_console_scripts(
    compose: dict[str, Any], scripts: dict[str, str]
) -> None:
    commands = {}
    for name, service in fleet_services(compose).items():
        command = service["command"]
        argv = command if isinstance(command, list) else command.split()
        assert argv[0] in scripts, f"{name}: {argv[0]!r} is not in [project.scripts]"
        commands[name] = argv
    assert commands["migrate"] == ["fleetctl", "db", "upgrade"]
    assert commands["conductor"] == ["conductor"]
    assert commands["compute-1"] == commands["compute-2"] == ["compute-agent"]
    assert {"conductor", "compute-agent", "fleetctl"} <= set(scripts)


def test_fleet_services_are_built_from_the_project_dockerfile(compose: dict[str, Any]) -> None:
    for name, service in fleet_services(compose).items():
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"


def test_dockerfile_is_slim_non_root_and_installs_the_project() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(image == "python:3.11-slim" for image in froms)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^RUN pip (wheel|install) .*'\.(\[\w+\])?'", text, flags=re.M)
    for package in ("shared_objects", "conductor", "compute_agent"):
        assert f"COPY {package} " in text


def test_build_context_keeps_the_virtualenv_out() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    lines = [line.strip() for line in ignore.splitlines() if line.strip()]
    assert lines[lines.index("**") + 1 :], "the ignore file must re-include the sources"
    assert "!.venv" not in lines


def _docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    for argv in (["docker", "info"], ["docker", "compose", "version"]):
        result = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        if result.returncode != 0:
            return False
    return True


@pytest.mark.docker
def test_cluster_comes_up_on_a_local_docker_engine() -> None:
    """Opt-in (``pytest -m docker``): build, start, wait for health, tear down."""
    if not _docker_engine_available():
        pytest.skip("no docker engine with the compose plugin on this machine")
    project = ["docker", "compose", "-f", str(COMPOSE), "-p", "fleet-test"]
    try:
        subprocess.run([*project, "up", "--build", "-d", "--wait"], check=True, timeout=900)
        ps = subprocess.run(
            [*project, "ps", "-a", "--format", "json"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Older compose versions print one JSON array, newer ones one object per line.
        text = ps.stdout.strip()
        rows = (
            json.loads(text)
            if text.startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        by_service: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_service.setdefault(row["Service"], []).append(row)
        assert by_service["migrate"][0]["ExitCode"] == 0
        assert len(by_service["conductor"]) == 2
        for name in ("conductor", "compute-1", "compute-2"):
            assert all(r["Health"] == "healthy" for r in by_service[name]), name
    finally:
        subprocess.run([*project, "down", "-v"], check=False, timeout=300)
