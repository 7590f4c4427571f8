"""The conductor's object policy over the in-process RPC runtime: who may call what, with the
caller taken from the (memory) broker's validated login, never from the message body."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog

from conductor.testing import local_conductor
from shared_objects import exception, releases
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance, Service

HOST_A, HOST_B = "h-a", "h-b"
AGENT_A = f"fleet-host-{HOST_A}"


async def _seed(url: str) -> tuple[str, str]:
    """An instance on each host, created by an operator."""
    async with local_conductor(url) as ops:
        ctxt = ops.agent_context()
        flavor = Flavor(ctxt, name="m1", vcpus=1, memory_mb=64, root_gb=1)
        await flavor.create()
        uuids = []
        for host in (HOST_A, HOST_B):
            inst = Instance(ctxt, name=host, host=host, flavor=flavor, vm_state="active")
            await inst.create()
            uuids.append(inst.uuid)
    return uuids[0], uuids[1]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/policy.db"


async def test_an_agent_reads_and_saves_its_own_instance_only(db_url: str) -> None:
    mine, theirs = await _seed(db_url)
    async with local_conductor(db_url, migrate=False, login=AGENT_A) as agent:
        ctxt = agent.agent_context()
        inst = await Instance.get_by_uuid(ctxt, mine)
        inst.progress = 5
        await inst.save()
        with pytest.raises(exception.Forbidden):
            await Instance.get_by_uuid(ctxt, theirs)


async def test_claims_in_the_body_grant_nothing(db_url: str) -> None:
    await _seed(db_url)
    async with local_conductor(db_url, migrate=False, login=AGENT_A) as agent:
        claims = RequestContext(user_id="admin", is_admin=True, roles=["admin"])
        flavor = await Flavor.get_by_name(claims, "m1")  # reading the catalogue is allowed
        with pytest.raises(exception.Forbidden, match=r"Flavor\.destroy"):
            await flavor.destroy()
        assert agent.login == AGENT_A


@pytest.mark.parametrize(
    ("host", "binary", "topic", "version"),
    [
        (HOST_B, releases.BINARY_COMPUTE, "compute", releases.SERVICE_VERSION),
        (HOST_A, releases.BINARY_COMPUTE, "compute", 0),
        (HOST_A, releases.BINARY_COMPUTE, "compute", releases.SERVICE_VERSION + 1),
        (HOST_A, releases.BINARY_CONDUCTOR, "conductor", releases.SERVICE_VERSION),
        (HOST_A, releases.BINARY_COMPUTE, "conductor", releases.SERVICE_VERSION),
    ],
)
async def test_register_only_itself_as_a_compute_of_a_supported_release(
    db_url: str, host: str, binary: str, topic: str, version: int
) -> None:
    async with local_conductor(db_url, login=AGENT_A) as agent:
        ctxt = agent.agent_context()
        with pytest.raises(exception.Forbidden, match=r"Service\.register"):
            await Service.register(ctxt, host, binary, topic, version)
        own = await Service.register(
            ctxt, HOST_A, releases.BINARY_COMPUTE, "compute", releases.RELEASES[0].service_version
        )
        assert own.host == HOST_A


async def test_refusals_and_accepted_changes_are_audited(db_url: str) -> None:
    mine, theirs = await _seed(db_url)
    async with local_conductor(db_url, migrate=False, login=AGENT_A) as agent:
        ctxt = agent.agent_context()
        with structlog.testing.capture_logs() as logs:
            inst = await Instance.get_by_uuid(ctxt, mine)
            inst.progress = 7
            await inst.save()
            with pytest.raises(exception.Forbidden):
                await Instance.get_by_uuid(ctxt, theirs)
    audits: list[dict[str, Any]] = [e for e in logs if e.get("event") == "audit"]
    assert [(e["outcome"], e["action"]) for e in audits] == [
        ("accepted", "Instance.save"),
        ("refused", "Instance.get_by_uuid"),
    ]
    assert all(e["caller"] == AGENT_A and e["role"] == "agent" for e in audits)


async def test_an_unknown_login_may_call_nothing(db_url: str) -> None:
    await _seed(db_url)
    async with local_conductor(db_url, migrate=False, login="guest") as nobody:
        with pytest.raises(exception.Forbidden):
            await Flavor.get_by_name(nobody.agent_context(), "m1")


async def test_a_host_may_not_disable_or_delete_services_delete_flavors_or_read_histories(
    db_url: str,
) -> None:
    """What ``fleetctl service disable|enable|delete``, ``flavor delete`` and ``action
    list|show`` do is refused to a host's login, its own service row included."""
    from shared_objects.objects import (
        InstanceActionEventList,
        InstanceActionList,
        InstanceFaultList,
    )

    mine, _ = await _seed(db_url)
    async with local_conductor(db_url, migrate=False, login=AGENT_A) as agent:
        ctxt = agent.agent_context()
        own = await Service.register(
            ctxt, HOST_A, releases.BINARY_COMPUTE, "compute", releases.SERVICE_VERSION
        )
        own.disabled = True
        own.disabled_reason = "mine to decide"
        with pytest.raises(exception.Forbidden):
            await own.save()
        with pytest.raises(exception.Forbidden, match=r"Service\.destroy"):
            await own.destroy()
        flavor = await Flavor.get_by_name(ctxt, "m1")
        with pytest.raises(exception.Forbidden, match=r"Flavor\.destroy"):
            await flavor.destroy()
        with pytest.raises(exception.Forbidden):
            await InstanceActionList.get_by_instance_uuid(ctxt, mine)
        with pytest.raises(exception.Forbidden):
            await InstanceActionEventList.get_by_action_id(ctxt, 1)
        with pytest.raises(exception.Forbidden):
            await InstanceFaultList.get_by_instance_uuid(ctxt, mine)
    async with local_conductor(db_url, migrate=False) as ops:
        ctxt = ops.agent_context()
        row = await Service.get_by_host_and_binary(ctxt, HOST_A, releases.BINARY_COMPUTE)
        assert not row.disabled and not row.deleted
        assert await Flavor.get_by_name(ctxt, "m1")
        # An operator may: the same calls succeed.
        row.disabled = True
        await row.save()
        assert list(await InstanceActionList.get_by_instance_uuid(ctxt, mine)) == []
        assert list(await InstanceFaultList.get_by_instance_uuid(ctxt, mine)) == []
        await (await Flavor.get_by_name(ctxt, "m1")).destroy()
        with pytest.raises(exception.FlavorNotFound):
            await Flavor.get_by_name(ctxt, "m1")
