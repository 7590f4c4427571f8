"""LocalCluster's per-process broker logins, without starting anything: who gets which URL and
which ``[security]`` settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.runtime.config import load_config
from shared_objects.runtime.identity import Identities, Role
from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.testing.broker_logins import BrokerLogins

ADMIN = "rabbit://guest:guest@127.0.0.1:5672/fleet-test-x"


class FakeCtl:
    def __init__(self) -> None:
        self.imports: list[Mapping[str, Any]] = []

    async def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        self.imports.append(definitions)

    async def delete_users(self, logins: Sequence[str]) -> None:
        pass


def cluster(tmp_path: Path, **spec: Any) -> tuple[LocalCluster, FakeCtl]:
    ctl = FakeCtl()
    logins = BrokerLogins(
        ADMIN, ctl=ctl, tag="c1", legacy_queue_names=False, agent_topic_queue=False
    )
    full = ClusterSpec(
        database_url="sqlite+aiosqlite:///x.db",
        transport_url=ADMIN,
        control_exchange="fleet-x",
        workdir=tmp_path,
        logins=logins,
        **spec,
    )
    return LocalCluster(full), ctl


def user(env: Mapping[str, str]) -> str | None:
    return parse_transport_url(env["FLEET_TRANSPORT_URL"]).users[0]


def fleet_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("FLEET_") and "TEST" not in k}


async def test_each_process_logs_in_as_itself(tmp_path: Path) -> None:
    local, ctl = cluster(tmp_path, hosts=("compute-1", "compute-2"), conductors=2)
    await local.provision(hosts=local.spec.hosts, conductors=[1, 2])
    assert len(ctl.imports) == 1  # one batch for the whole cluster
    conductor = local.conductor_handle(2).env
    agent = local.agent_handle("compute-1").env
    assert user(conductor) == "fleet-conductor-c1-2"
    assert user(agent) == "fleet-host-c1-compute-1"
    assert parse_transport_url(local.operator_url).users == ("fleet-operator-c1",)
    assert "FLEET_DATABASE_URL" not in agent
    # The processes resolve the logins back to their roles with the settings they are given.
    for env, login, role in (
        (conductor, "fleet-conductor-c1-2", Role.CONDUCTOR),
        (agent, "fleet-host-c1-compute-1", Role.AGENT),
        (agent, "fleet-operator-c1", Role.OPERATOR),
    ):
        ids = Identities(load_config(fleet_env(env)).security)
        assert ids.resolve(login).role is role
    assert Identities(load_config(fleet_env(agent)).security).resolve(
        "fleet-host-c1-compute-1"
    ).hosts == {"compute-1"}

    # A host started later: its login on demand, in one more batch.
    await local.provision(hosts=["compute-9"])
    assert len(ctl.imports) == 2
    assert [u["name"] for u in ctl.imports[1]["users"]] == ["fleet-host-c1-compute-9"]
    assert user(local.agent_handle("compute-9").env) == "fleet-host-c1-compute-9"


async def test_old_release_processes_get_no_security_settings(tmp_path: Path) -> None:
    old = tmp_path / "release-1.0"
    local, _ = cluster(
        tmp_path, hosts=("compute-old", "compute-new"), agent_source={"compute-old": old}
    )
    await local.provision(hosts=local.spec.hosts, conductors=[1])
    old_env = local.agent_handle("compute-old").env
    new_env = local.agent_handle("compute-new").env
    assert not any(k.startswith("FLEET_SECURITY__") for k in old_env)
    assert new_env["FLEET_SECURITY__HOST_LOGIN_PREFIX"] == "fleet-host-c1-"
    assert user(old_env) == "fleet-host-c1-compute-old"  # its own login, older queue names
    perm = local.spec.logins.permissions("fleet-host-c1-compute-old")  # type: ignore[union-attr]
    assert "|compute|" in perm.read or perm.read.endswith("|compute)$")


async def test_a_shared_legacy_login_for_old_agents(tmp_path: Path) -> None:
    old = tmp_path / "release-1.0"
    local, _ = cluster(
        tmp_path,
        hosts=("compute-1", "compute-2"),
        agent_source={"compute-1": old, "compute-2": old},
        conductor_source=old,
        legacy_shared_login="fleet",
    )
    await local.provision(hosts=local.spec.hosts, conductors=[1])
    assert user(local.agent_handle("compute-1").env) == "fleet"
    assert user(local.agent_handle("compute-2").env) == "fleet"
    assert not any(k.startswith("FLEET_SECURITY__") for k in local.conductor_handle(1).env)

    # The conductor moves to this release: it learns which hosts the shared login speaks for.
    local.spec.conductor_source = None
    conductor = load_config(fleet_env(local.conductor_handle(1).env)).security
    assert conductor.legacy_shared_login == "fleet"
    assert conductor.legacy_hosts == ("compute-1", "compute-2")

    # compute-1 upgraded: its own login; the others are told only compute-2 is still old.
    local.spec.agent_source = {"compute-2": old}
    await local.provision(hosts=["compute-1"])
    env = local.agent_handle("compute-1").env
    assert user(env) == "fleet-host-c1-compute-1"
    security = load_config(fleet_env(env)).security
    assert (security.legacy_shared_login, security.legacy_hosts) == ("fleet", ("compute-2",))
    assert local.login_of("compute-2") == "fleet"
    # The shared login keeps the rights of the hosts still old, and only those.
    perm = local.spec.logins.permissions("fleet")  # type: ignore[union-attr]
    assert "compute\\.compute-2" in perm.read and "compute\\.compute-1" not in perm.read


async def test_without_logins_everyone_uses_the_given_url(tmp_path: Path) -> None:
    local = LocalCluster(
        ClusterSpec(database_url="sqlite+aiosqlite:///x.db", transport_url=ADMIN, workdir=tmp_path)
    )
    await local.provision(hosts=["compute-1"], conductors=[1])
    assert local.agent_handle("compute-1").env["FLEET_TRANSPORT_URL"] == ADMIN
    assert local.conductor_handle(1).env["FLEET_TRANSPORT_URL"] == ADMIN
    assert local.operator_url == ADMIN and local.login_of("compute-1") is None


def ports(hosts: Sequence[str]) -> list[int | None]:
    return [urlsplit(h).port for h in hosts]


async def test_a_proxied_agent_reaches_the_broker_through_the_proxy_port_as_itself(
    tmp_path: Path,
) -> None:
    local, _ = cluster(
        tmp_path, hosts=("compute-1", "compute-2"), agent_broker_port={"compute-2": 40001}
    )
    await local.provision(hosts=local.spec.hosts, conductors=[1])
    proxied = parse_transport_url(local.agent_handle("compute-2").env["FLEET_TRANSPORT_URL"])
    direct = parse_transport_url(local.agent_handle("compute-1").env["FLEET_TRANSPORT_URL"])
    assert ports(proxied.hosts) == [40001]
    assert ports(direct.hosts) == [5672]
    assert proxied.users[0] == local.login_of("compute-2")
    assert proxied.virtual_host == direct.virtual_host == "fleet-test-x"
    # Conductors never go through an agent's proxy.
    conductor = parse_transport_url(local.conductor_handle(1).env["FLEET_TRANSPORT_URL"])
    assert ports(conductor.hosts) == [5672]


async def test_messaging_options_reach_every_process_and_the_operator_transport(
    tmp_path: Path,
) -> None:
    # A queue declared with other flags than an existing one is refused (406): quorum options
    # must be the same for the conductors, the agents and this process's own transport.
    local, _ = cluster(
        tmp_path, messaging={"rabbit_quorum_queue": True, "rabbit_qos_prefetch_count": 8}
    )
    await local.provision(hosts=["compute-1"], conductors=[1])
    for env in (local.conductor_handle(1).env, local.agent_handle("compute-1").env):
        assert env["FLEET_MESSAGING__RABBIT_QUORUM_QUEUE"] == "true"
        assert env["FLEET_MESSAGING__RABBIT_QOS_PREFETCH_COUNT"] == "8"
        assert load_config(env).messaging.rabbit_quorum_queue is True
    operator = local._messaging_config(local.operator_login)
    assert operator.rabbit_quorum_queue is True
    assert operator.control_exchange == "fleet-x"
