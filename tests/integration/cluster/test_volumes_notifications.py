"""Notifications reach a real oslo.messaging listener; detach_volume end to end (issue 4 c, d)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from compute_agent.virt.state_view import hypervisor_view
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.testing import PeerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

OSLO_PEER = Path(__file__).resolve().parents[1] / "interop" / "peers" / "oslo_peer.py"


async def _oslo_listener(cluster: Any) -> PeerProcess:
    argv = [
        sys.executable,
        str(OSLO_PEER),
        "listener",
        "--url",
        cluster.spec.transport_url,
        "--exchange",
        cluster.spec.control_exchange,
        "--topic",
        "versioned_notifications",
        "--max-seconds",
        "120",
    ]
    peer = PeerProcess(argv, name="oslo-listener")
    await peer.start()
    await peer.wait_event(lambda e: e.get("event") == "ready", within=30)
    return peer


async def test_oslo_listener_sees_create_and_volume_detach_notifications(
    cluster_factory: Any,
) -> None:
    async with cluster_factory() as cluster:
        listener = await _oslo_listener(cluster)
        try:
            (uuid,) = await cluster.boot(flavor="small", name="vm")
            (inst,) = await cluster.wait_instances([uuid])
            assert inst.vm_state == "active"
            await cluster.tasks.attach_volume(
                cluster.ctxt, instance_uuid=uuid, volume_id="vol-1", device_name="/dev/vdb"
            )
            view = await hypervisor_view(cluster.workdir / "hypervisors")
            assert view[inst.host][uuid].volumes == {"vol-1": "/dev/vdb"}

            await cluster.tasks.detach_volume(cluster.ctxt, instance_uuid=uuid, volume_id="vol-1")
            assert list(await BlockDeviceMappingList.get_by_instance_uuid(cluster.ctxt, uuid)) == []
            view = await hypervisor_view(cluster.workdir / "hypervisors")
            assert view[inst.host][uuid].volumes == {}

            wanted = [
                "instance.create.start",
                "instance.create.end",
                "instance.volume_detach.start",
                "instance.volume_detach.end",
            ]
            seen: dict[str, Any] = {}
            # The notifications queue outlives a test (as in oslo): match on this instance.
            for event_type in wanted:
                seen[event_type] = await listener.wait_event(
                    lambda e, t=event_type: (
                        e.get("event_type") == t
                        and (e.get("payload") or {}).get("fleet_object.data", {}).get("uuid")
                        == uuid
                    ),
                    within=15,
                )
            end = seen["instance.create.end"]
            assert end["publisher_id"] == f"compute.{inst.host}"
            data = end["payload"]["fleet_object.data"]
            assert (data["uuid"], data["vm_state"], data["host"]) == (uuid, "active", inst.host)
            assert end["payload"]["fleet_object.version"] == "1.0"
            detach = seen["instance.volume_detach.end"]["payload"]["fleet_object.data"]
            assert detach["volume_id"] == "vol-1"
        finally:
            await listener.stop()


async def test_detaching_an_unknown_volume_is_a_clear_error_and_changes_nothing(
    cluster_factory: Any,
) -> None:
    from shared_objects import exception

    async with cluster_factory() as cluster:
        (uuid,) = await cluster.boot(flavor="small", name="vm")
        await cluster.wait_instances([uuid])
        with pytest.raises(exception.BlockDeviceMappingNotFound):
            await cluster.tasks.detach_volume(cluster.ctxt, instance_uuid=uuid, volume_id="nope")
        with pytest.raises(exception.InstanceNotFound):
            await cluster.tasks.detach_volume(
                cluster.ctxt,
                instance_uuid="00000000-0000-0000-0000-000000000000",
                volume_id="nope",
            )
