"""docker-compose.yml and deploy/Dockerfile: compose-spec schema plus Fleet's own rules.

The schema (vendored by the check-jsonschema package) catches unknown keys and bad values; it
does not know which services exist or what Fleet needs, so the project checks below do.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
from compose_model import (
    AGENTS,
    DATABASE_USERS,
    DEFINITIONS,
    DEFINITIONS_CONF,
    DEFINITIONS_SCRIPT,
    DOCKERFILE,
    ROOT,
    SCHEMA,
    SECRET_FILE_VARIABLES,
    environment,
    fleet_services,
    raw_environment,
    secret_files,
)


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
    default = {n for n, s in compose["services"].items() if not s.get("profiles")}
    assert default == {
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


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    data = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_definitions", DEFINITIONS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def login_of(service: dict[str, Any]) -> tuple[str, str, str]:
    """(login, password, vhost) of a Fleet service's transport URL."""
    url = urlsplit(environment(service)["FLEET_TRANSPORT_URL"])
    assert url.username and url.password is not None
    return unquote(url.username), unquote(url.password), unquote(url.path.lstrip("/")) or "/"


def verifies(password_hash: str, password: str) -> bool:
    raw = base64.b64decode(password_hash)
    return raw[4:] == hashlib.sha256(raw[:4] + password.encode()).digest()


def test_each_fleet_service_gets_the_environment_it_needs(compose: dict[str, Any]) -> None:
    services = fleet_services(compose)
    assert set(services) == {"migrate", "conductor", "compute-1", "compute-2"}
    pg_env = environment(compose["services"]["postgres"])
    for name, service in services.items():
        env = environment(service)
        transport = urlsplit(env["FLEET_TRANSPORT_URL"])
        assert transport.scheme == "rabbit"
        assert transport.hostname == "rabbitmq"
        assert transport.path == "/fleet", name
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


def test_no_service_uses_the_broker_administrator_or_guest(
    compose: dict[str, Any], definitions: dict[str, Any]
) -> None:
    admins = {u["name"] for u in definitions["users"] if "administrator" in u["tags"]}
    assert admins == {"fleet-admin"}
    for name, service in fleet_services(compose).items():
        login, password, _ = login_of(service)
        assert login not in admins | {"guest"}, name
        assert password not in ("guest", "fleet", "fleet-admin-local-only"), name
    # The broker seeds no default guest user: it loads the definitions at boot instead.
    rabbit_env = environment(compose["services"]["rabbitmq"])
    assert "RABBITMQ_DEFAULT_USER" not in rabbit_env
    assert "guest" not in {u["name"] for u in definitions["users"]}


def test_every_service_logs_in_as_its_own_role(compose: dict[str, Any]) -> None:
    from shared_objects.runtime.config import load_config
    from shared_objects.runtime.identity import Identities, Role

    services = fleet_services(compose)
    agent_logins = set()
    for host in AGENTS:
        env = environment(services[host])
        login, _, _ = login_of(services[host])
        cfg = load_config(env)
        identities = Identities(cfg.security)
        # The naming rule: the agent of host X logs in as fleet-host-X, and no other login.
        assert login == identities.login_for_host(env["FLEET_HOST"]) == f"fleet-host-{host}"
        assert identities.resolve(login).hosts == {env["FLEET_HOST"]}
        agent_logins.add(login)
    assert len(agent_logins) == len(AGENTS)
    identities = Identities()
    assert identities.resolve(login_of(services["conductor"])[0]).role is Role.CONDUCTOR
    assert identities.resolve(login_of(services["migrate"])[0]).role is Role.OPERATOR


def test_rabbitmq_loads_the_definitions_at_boot(compose: dict[str, Any]) -> None:
    mounts = {}
    for mount in compose["services"]["rabbitmq"]["volumes"]:
        source, target = mount.split(":")[:2]
        mounts[target] = source
    conf = DEFINITIONS_CONF.read_text(encoding="utf-8")
    [path] = re.findall(r"^load_definitions\s*=\s*(\S+)\s*$", conf, flags=re.M)
    assert (ROOT / mounts[path]).resolve() == DEFINITIONS
    conf_mount = "/etc/rabbitmq/conf.d/" + DEFINITIONS_CONF.name
    assert (ROOT / mounts[conf_mount]).resolve() == DEFINITIONS_CONF


def test_definitions_grant_each_service_login_its_role(
    compose: dict[str, Any], definitions: dict[str, Any]
) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    perms = {(p["user"], p["vhost"]): p for p in definitions["permissions"]}
    vhosts = {v["name"] for v in definitions["vhosts"]}
    for name, service in fleet_services(compose).items():
        login, password, vhost = login_of(service)
        assert vhost in vhosts, name
        user = users[login]
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert verifies(user["password_hash"], password), f"{name}: password does not match"
        assert user["tags"] == [], name
        assert (login, vhost) in perms, name
    for host in AGENTS:
        perm = perms[(f"fleet-host-{host}", "fleet")]
        assert re.search(perm["read"], f"compute.{host}")
        assert not re.search(perm["read"], "conductor")
        for other in AGENTS:
            if other != host:
                assert not re.search(perm["read"], f"compute.{other}")
    admin = users["fleet-admin"]
    assert verifies(admin["password_hash"], generator().ADMIN[1])


def test_definitions_file_is_what_the_generator_writes(definitions: dict[str, Any]) -> None:
    # Password hashes are salted afresh on every run: compare everything else.
    def strip(data: dict[str, Any]) -> dict[str, Any]:
        users = [{k: v for k, v in u.items() if k != "password_hash"} for u in data["users"]]
        return {**data, "users": users}

    module = generator()
    assert strip(module.definitions()) == strip(definitions), (
        "deploy/rabbitmq/definitions.json is stale: run "
        ".venv/bin/python deploy/rabbitmq/make_definitions.py > deploy/rabbitmq/definitions.json"
    )
    passwords = dict(module.SERVICE_LOGINS.values())
    for user in definitions["users"]:
        if user["name"] in passwords:
            assert verifies(user["password_hash"], passwords[user["name"]]), user["name"]


def test_fleet_environment_is_accepted_by_the_config_loader(compose: dict[str, Any]) -> None:
    from shared_objects.runtime.config import load_config

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
    # Both stages on the official slim image by default (the deployment test passes a local
    # Debian image as PYTHON_IMAGE: tests/deploy/compose_docker.py).
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, flags=re.M)
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) == 2 and all(image == "${PYTHON_IMAGE}" for image in froms)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Dependencies at the tested versions, then the project itself; installed from those wheels.
    assert re.search(r"pip wheel .*-c constraints\.txt -r requirements\.txt$", text, flags=re.M)
    assert re.search(r"^RUN /build/bin/pip wheel .*--no-deps .* \.$", text, flags=re.M)
    assert re.search(r"pip install .*--no-index .*/wheels/\*\.whl", text)
    for package in ("shared_objects", "conductor", "compute_agent"):
        assert f"COPY {package} " in text


def test_build_context_keeps_the_virtualenv_out() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    lines = [line.strip() for line in ignore.splitlines() if line.strip()]
    assert lines[lines.index("**") + 1 :], "the ignore file must re-include the sources"
    assert "!.venv" not in lines


def test_passwords_are_compose_secrets_not_environment(compose: dict[str, Any]) -> None:
    from shared_objects.runtime.config import load_config

    files = secret_files()
    for name, service in compose["services"].items():
        env = raw_environment(service)
        # No URL with user-info and no password in any environment (docker inspect shows it).
        assert not [v for v in env.values() if "://" in v and "@" in v], name
        assert "POSTGRES_PASSWORD" not in env, name
        mounted = set(service.get("secrets", []))
        for variable in SECRET_FILE_VARIABLES:
            if variable in env:
                secret = env[variable].removeprefix("/run/secrets/")
                assert env[variable] == f"/run/secrets/{secret}", name
                assert secret in mounted, f"{name} reads {secret} without mounting it"
                assert files[secret].is_file(), secret
    for name, service in fleet_services(compose).items():
        env = raw_environment(service)
        # The loader reads the files itself (paths remapped from /run/secrets to the repo).
        remapped = {
            k: str(files[v.removeprefix("/run/secrets/")]) if k in SECRET_FILE_VARIABLES else v
            for k, v in env.items()
        }
        cfg = load_config(remapped)
        assert cfg.messaging.transport_url == environment(service)["FLEET_TRANSPORT_URL"], name


def test_services_do_not_restart_forever_on_a_configuration_error(
    compose: dict[str, Any],
) -> None:
    # Docker cannot exclude an exit status from a restart policy (systemd's
    # RestartPreventExitStatus=2): tini reports a configuration error (exit 2) as 0, which
    # on-failure leaves exited, and every other failure is restarted. The deployment test sees
    # both happen (tests/deploy/compose_docker.py).
    for name in ("conductor", *AGENTS):
        service = compose["services"][name]
        assert service["restart"] == "on-failure", name
        assert service["entrypoint"] == ["tini", "-e", "2", "--"], name
    assert re.search(r"apt-get install .*\btini\b", DOCKERFILE.read_text(encoding="utf-8"))
