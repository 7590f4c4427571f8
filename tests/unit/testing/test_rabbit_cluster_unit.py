"""RabbitCluster without starting it: addresses and what it reads from rabbitmqctl."""

from __future__ import annotations

from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.testing.rabbit_cluster import RabbitCluster, _pid_node


def test_cluster_nodes_share_a_cookie_and_have_their_own_names_and_ports() -> None:
    cluster = RabbitCluster()
    nodes = cluster.nodes
    assert len(nodes) == 3
    assert len({n.cookie for n in nodes}) == 1
    assert len(set(cluster.nodenames)) == 3
    assert len({n.port for n in nodes} | {n.dist_port for n in nodes}) == 6


def test_url_lists_every_node_with_the_vhost() -> None:
    cluster = RabbitCluster()
    parsed = parse_transport_url(cluster.url_for("fleet x", user="fleet-host-a", password="p/w"))
    assert len(parsed.hosts) == 3
    assert parsed.users == ("fleet-host-a",) * 3
    assert all(f":{n.port}/" in h for n, h in zip(cluster.nodes, parsed.hosts, strict=True))
    assert all(h.endswith("/fleet%20x") for h in parsed.hosts)


def test_pid_node_reads_the_node_from_rabbitmqctls_table_format() -> None:
    assert _pid_node("<fleetclu-ab12cd-2@localhost.1796651821.689.0>") == (
        "fleetclu-ab12cd-2@localhost"
    )
    assert _pid_node("") == ""
