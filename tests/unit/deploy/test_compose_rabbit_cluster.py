"""docker-compose.yml, profile rabbit-cluster: three RabbitMQ nodes with quorum queues
(docs/operations.md, "A RabbitMQ cluster with quorum queues")."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from compose_model import (
    CLUSTER_CONF,
    CLUSTER_NODES,
    CLUSTER_OVERRIDE,
    ROOT,
    environment,
    fleet_services,
    raw_environment,
    secret_files,
)


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge-control tags (``!override``, ``!reset``) kept as plain values."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!override", _tagged)
_ComposeLoader.add_constructor("!reset", _tagged)


@pytest.fixture(scope="module")
def cluster_override() -> dict[str, Any]:
    data = yaml.load(CLUSTER_OVERRIDE.read_text(encoding="utf-8"), Loader=_ComposeLoader)
    assert isinstance(data, dict)
    return data


def test_cluster_profile_has_three_nodes_with_fleet_config_and_one_cookie(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    profiled = {n for n, s in services.items() if s.get("profiles")}
    assert profiled == set(CLUSTER_NODES)
    listed = re.findall(
        r"^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*rabbit@(\S+)\s*$",
        CLUSTER_CONF.read_text(encoding="utf-8"),
        flags=re.M,
    )
    assert sorted(listed) == list(CLUSTER_NODES)
    single = {m.split(":")[1] for m in services["rabbitmq"]["volumes"] if m.startswith("./")}
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["profiles"] == ["rabbit-cluster"]
        assert node["hostname"] == name
        assert node["image"] == services["rabbitmq"]["image"]
        assert "healthcheck" in node
        mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"]}
        # The same definitions and limits as the single broker, plus the peer list.
        assert single <= set(mounts), name
        assert (
            ROOT / mounts["/etc/rabbitmq/conf.d/" + CLUSTER_CONF.name]
        ).resolve() == CLUSTER_CONF
        assert node["secrets"] == ["rabbitmq_erlang_cookie"]
        assert "/run/secrets/rabbitmq_erlang_cookie" in " ".join(node["entrypoint"])
        assert not any("COOKIE" in key for key in raw_environment(node)), name
    assert len({services[n]["volumes"][0] for n in CLUSTER_NODES}) == 3  # own data each
    assert secret_files()["rabbitmq_erlang_cookie"].read_text().strip()


def test_cluster_override_points_every_fleet_service_at_the_three_nodes(
    compose: dict[str, Any], cluster_override: dict[str, Any]
) -> None:
    from shared_objects.runtime.config import load_config
    from shared_objects.runtime.messaging.urls import parse_transport_url

    services = fleet_services(compose)
    override = cluster_override["services"]
    assert set(override) == set(services) | {"rabbitmq"}
    assert override["rabbitmq"]["profiles"] == ["single-broker"]
    secrets = {n: ROOT / spec["file"] for n, spec in cluster_override["secrets"].items()}
    for name, service in services.items():
        env = environment(service)
        single = urlsplit(env["FLEET_TRANSPORT_URL"])
        [secret] = [s for s in service["secrets"] if s.endswith("_transport_url")]
        url = secrets[secret].read_text(encoding="utf-8").strip()
        parsed = parse_transport_url(url)
        assert parsed.hostnames == CLUSTER_NODES, name
        # Same login, password and vhost as with the single broker (same definitions).
        assert set(parsed.users) == {single.username}, name
        assert url.count(f":{single.password}@") == 3, name
        assert url.endswith(single.path), name
        env.update(override[name]["environment"])
        env["FLEET_TRANSPORT_URL"] = url
        cfg = load_config(env)
        assert cfg.messaging.rabbit_quorum_queue is True, name
        depends = override[name]["depends_on"]
        assert "rabbitmq" not in depends, name
        assert {d for d in depends if d.startswith("rabbitmq-")} == set(CLUSTER_NODES), name
        assert all(depends[d]["condition"] == "service_healthy" for d in CLUSTER_NODES), name
