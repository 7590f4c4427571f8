"""What the compose tests read: docker-compose.yml, its secrets and the environment each service
ends up with (secret files resolved), shared by the compose test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import check_jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SCHEMA = Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
FLEET_IMAGE = "fleet:latest"
# Services that must reach the database; every other Fleet service must not get its URL.
DATABASE_USERS = {"conductor", "migrate"}
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
DEFINITIONS_CONF = ROOT / "deploy" / "rabbitmq" / "30-fleet-definitions.conf"
DEFINITIONS_SCRIPT = ROOT / "deploy" / "rabbitmq" / "make_definitions.py"
AGENTS = ("compute-1", "compute-2")
CLUSTER_OVERRIDE = ROOT / "deploy" / "compose" / "rabbit-cluster.yml"
CLUSTER_CONF = ROOT / "deploy" / "rabbitmq" / "40-fleet-cluster.conf"
CLUSTER_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")


def fleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == FLEET_IMAGE}


# Variables naming a compose secret file, and the variable whose value the file holds.
SECRET_FILE_VARIABLES = {
    "FLEET_MESSAGING__TRANSPORT_URL_FILE": "FLEET_TRANSPORT_URL",
    "FLEET_DATABASE__URL_FILE": "FLEET_DATABASE_URL",
    "POSTGRES_PASSWORD_FILE": "POSTGRES_PASSWORD",
}


def secret_files() -> dict[str, Path]:
    """Compose secret name -> the file in the repository it is made of."""
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return {name: ROOT / spec["file"] for name, spec in data.get("secrets", {}).items()}


def raw_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with each secret file variable replaced by the value the
    file holds (``FLEET_TRANSPORT_URL`` ...), as the service ends up configured."""
    env = raw_environment(service)
    files = secret_files()
    for variable, target in SECRET_FILE_VARIABLES.items():
        if variable in env:
            name = env.pop(variable).removeprefix("/run/secrets/")
            env[target] = files[name].read_text(encoding="utf-8").strip()
    return env
