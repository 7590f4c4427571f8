"""Each service's metrics endpoint after real traffic (issue 7 c): counters of the RPC methods
used are non-zero, and ``/readyz`` / ``/healthz`` answer 200 once the service is ready."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from importlib import metadata

import pytest
from ops_cluster import OpsCluster, OpsClusterFactory, ahttp_get
from prometheus_client.parser import text_string_to_metric_families

from shared_objects import releases
from shared_objects.testing.eventually import eventually

pytestmark = pytest.mark.integration


def server_calls(text: str, outcome: str = "ok") -> Counter[str]:
    """``{method: n}`` of ``fleet_rpc_calls_total`` for role ``server`` and ``outcome``."""
    calls: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "fleet_rpc_calls":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "fleet_rpc_calls_total"
                and labels.get("role") == "server"
                and labels.get("outcome") == outcome
            ):
                calls[labels["method"]] += int(sample.value)
    return calls


def gauge(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def labelled(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels`` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_metrics_count_the_rpc_methods_used_and_readyz_is_200(
    ops_cluster: OpsClusterFactory,
) -> None:
    async with ops_cluster(metrics=True) as cluster:
        ports = cluster.metrics_ports
        assert set(ports) == {"conductor-1", "compute-1", "compute-2"}
        for name, port in ports.items():
            assert (await ahttp_get(port, "/readyz"))[0] == 200, name
            assert (await ahttp_get(port, "/healthz"))[0] == 200, name

        uuids = await cluster.boot(flavor="small", name="metered", count=6)
        insts = await cluster.wait_instances(uuids, timeout=60)
        assert {i.vm_state for i in insts} == {"active"}
        per_host = Counter(str(i.host) for i in insts)
        assert set(per_host) == {"compute-1", "compute-2"}

        status, text = await ahttp_get(ports["conductor-1"], "/metrics")
        assert status == 200
        calls = server_calls(text)
        assert calls["build_instances"] >= 1
        # Agents' object calls (CAS saves, action events, BDM/SG lookups) land on the conductor.
        assert calls["object_action"] >= 3 * len(uuids)
        assert calls["object_class_action_versions"] > 0
        assert gauge(text, "fleet_ready") == 1.0
        # Latency histograms are filled for what the conductor served.
        assert labelled(text, "fleet_rpc_latency_seconds_count", method="build_instances") >= 1

        # Instances by state: the census runs every report interval.
        async def census() -> bool:
            _, text = await ahttp_get(ports["conductor-1"], "/metrics")
            return labelled(text, "fleet_instances", vm_state="active") == len(uuids)

        await eventually(census, 10, interval=0.2, what="the instance census")

        for host, built in per_host.items():
            # Exactly one run_instance handled per instance the agent built. A call is counted
            # when its handler returns, which is a little after the instance is ACTIVE (action
            # finish, notification): poll for a bounded time.
            async def handled(host: str = host, built: int = built) -> str:
                status, text = await ahttp_get(ports[host], "/metrics")
                assert status == 200
                assert server_calls(text)["run_instance"] >= built, (host, server_calls(text))
                return text

            text = await eventually(handled, 20, interval=0.2)
            assert server_calls(text)["run_instance"] == built, (host, server_calls(text))
            # ...and what it asked of the conductor, as a client.
            assert (
                labelled(text, "fleet_rpc_calls_total", role="client", method="object_action") > 0
            )
            assert server_calls(text, "error")["run_instance"] == 0
            assert gauge(text, "fleet_ready") == 1.0
            assert (await ahttp_get(ports[host], "/readyz"))[0] == 200


async def fleetctl(cluster: OpsCluster, *argv: str) -> str:
    env = cluster._base_env(cluster.operator_login)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conductor.tools.fleetctl",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_the_version_agrees_in_fleetctl_services_metrics_and_the_package_metadata(
    ops_cluster: OpsClusterFactory,
) -> None:
    """Issue 16 e: one version, four places. The package metadata and ``fleetctl --version``
    show it whole, ``/metrics`` as the ``version`` label of ``fleet_service_info``, and
    ``fleetctl services`` as the release (its major.minor) beside the stored service version."""
    package = metadata.version("fleet")
    release = ".".join(package.split(".")[:2])
    assert release == releases.CURRENT.name
    async with ops_cluster(metrics=True) as cluster:
        assert (await fleetctl(cluster, "--version")).strip() == f"fleetctl {package}"
        services = json.loads(await fleetctl(cluster, "services", "-f", "json"))
        assert {s["host"] for s in services} == {"conductor-1", "compute-1", "compute-2"}
        for row in services:
            assert (row["version"], row["release"]) == (releases.SERVICE_VERSION, release), row
        table = await fleetctl(cluster, "services", "-c", "host", "-c", "version", "-c", "release")
        assert f"| {releases.SERVICE_VERSION}       | {release}     |" in table, table
        for name, port in cluster.metrics_ports.items():
            status, text = await ahttp_get(port, "/metrics")
            assert status == 200, name
            info = [
                sample.labels["version"]
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "fleet_service_info"
            ]
            assert info == [package], (name, info)
