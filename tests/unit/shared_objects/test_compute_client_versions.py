"""Compute RPC 1.1 and 1.2 degrade for older peers; 1.1 objects backport to 1.0 without their
fields."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from shared_objects import releases
from shared_objects.context import RequestContext
from shared_objects.objects.block_device_mapping import BlockDeviceMapping, BlockDeviceMappingList
from shared_objects.objects.instance import Instance
from shared_objects.objects.live_migrate_data import LiveMigrateData
from shared_objects.objects.migration import Migration
from shared_objects.rpc_clients.compute import API_VERSION, ComputeAPI
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    RPCServer,
    Target,
    expose,
    get_transport,
    request_version,
)
from shared_objects.serializer import FleetObjectSerializer
from shared_objects.upgrade_levels import ComputeUpgradeLevels, Levels


class OldAgent:
    """A compute endpoint of API 1.0: live_migration_abort has no reason."""

    target = Target(version="1.0")

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    @expose
    async def live_migration_abort(self, ctxt: RequestContext, migration_uuid: str) -> None:
        self.calls.append({"migration_uuid": migration_uuid})


class NewAgent(OldAgent):
    target = Target(version="1.1")

    @expose
    async def live_migration_abort(  # type: ignore[override]
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        self.calls.append({"migration_uuid": migration_uuid, "reason": reason})


async def _abort(endpoint: OldAgent, cap: str | None) -> list[dict[str, Any]]:
    cfg = MessagingConfig(transport_url=f"memory://{uuid.uuid4().hex}")
    async with get_transport(cfg) as transport:
        async with RPCServer(transport, Target(topic="compute", server="h"), [endpoint]):
            api = ComputeAPI(transport, version_cap=cap, timeout=5)
            await api.live_migration_abort(
                RequestContext(), "h", migration_uuid="m1", timeout=5, reason="maintenance"
            )
    return endpoint.calls


async def test_abort_reason_is_left_out_while_capped_at_1_0() -> None:
    assert await _abort(OldAgent(), "1.0") == [{"migration_uuid": "m1"}]


async def test_abort_reason_reaches_a_1_1_agent_when_uncapped() -> None:
    calls = await _abort(NewAgent(), None)
    assert calls == [{"migration_uuid": "m1", "reason": "maintenance"}]


def test_migration_and_live_migrate_data_1_1_fields_are_dropped_for_1_0() -> None:
    migration = Migration(disk_total=10, disk_processed=5, disk_remaining=5, status="running")
    data = migration.obj_to_primitive(target_version="1.0")["versioned_object.data"]
    assert not {"disk_total", "disk_processed", "disk_remaining"} & set(data)
    lmd = LiveMigrateData.from_driver_data({"source_host": "a", "bandwidth_limit_mb_s": 50})
    old = lmd.obj_to_primitive(target_version="1.0")["versioned_object.data"]
    assert "bandwidth_limit_mb_s" not in old and old["source_host"] == "a"
    assert lmd.to_driver_data()["bandwidth_limit_mb_s"] == 50


# --- run_instance: 1.2 carries the BDMs and event_started ------------------------


class OldBuildAgent:
    """A compute endpoint of API 1.0/1.1: run_instance takes exactly the four old arguments,
    so any extra argument would fail the call (the old message shape is checked by Python)."""

    target = Target(version="1.1")

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[str | None, dict[str, Any]]] = asyncio.Queue()

    @expose
    async def run_instance(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
    ) -> None:
        args = {
            "instance": instance,
            "request_spec": request_spec,
            "alternates": alternates,
            "attempt": attempt,
        }
        self.received.put_nowait((request_version(), args))


class NewBuildAgent(OldBuildAgent):
    target = Target(version="1.2")

    @expose
    async def run_instance(  # type: ignore[override]
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
        **extras: Any,
    ) -> None:
        await super().run_instance(ctxt, instance, request_spec, alternates, attempt)
        version, args = self.received.get_nowait()
        self.received.put_nowait((version, {**args, **extras}))


INSTANCE_UUID = "3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11"


def _extras() -> dict[str, Any]:
    bdm = BlockDeviceMapping(
        id=7,
        uuid="5a1e0a8e-7b9f-4a86-8f1c-2b1f7f1b9a01",
        instance_uuid=INSTANCE_UUID,
        source_type="volume",
        destination_type="volume",
        volume_id="vol-1",
        device_name="/dev/vdb",
    )
    return {
        "block_device_mappings": BlockDeviceMappingList(objects=[bdm]),
        "event_started": True,
    }


async def _run_instance(
    endpoint: OldBuildAgent,
    cap: str | None,
    extras: dict[str, Any],
    levels: ComputeUpgradeLevels | None = None,
) -> tuple[str | None, dict[str, Any]]:
    cfg = MessagingConfig(transport_url=f"memory://{uuid.uuid4().hex}")
    async with get_transport(cfg) as transport:
        server = RPCServer(
            transport,
            Target(topic="compute", server="h"),
            [endpoint],
            serializer=FleetObjectSerializer(),
        )
        async with server:
            api = ComputeAPI(transport, version_cap=cap, timeout=5, levels=levels)
            await api.run_instance(
                RequestContext(),
                "h",
                instance=Instance(uuid=INSTANCE_UUID, name="vm"),
                request_spec={"attempt": 1},
                alternates=["h2"],
                attempt=1,
                **extras,
            )
            return await asyncio.wait_for(endpoint.received.get(), 5)


def test_api_1_2_is_release_1_1s() -> None:
    assert API_VERSION == "1.2"
    assert releases.CURRENT.compute_rpc_api == API_VERSION
    assert releases.by_name("1.0").compute_rpc_api == "1.0"


async def test_run_instance_at_1_2_carries_the_extras() -> None:
    version, args = await _run_instance(NewBuildAgent(), None, _extras())
    assert version == "1.2"
    assert args["event_started"] is True
    (bdm,) = args["block_device_mappings"]
    assert isinstance(args["block_device_mappings"], BlockDeviceMappingList)
    assert (bdm.volume_id, bdm.device_name) == ("vol-1", "/dev/vdb")
    # The rules are the agent's to read once it has taken the instance, never a snapshot.
    assert "security_group_rules" not in args
    assert args["instance"].uuid == INSTANCE_UUID and args["attempt"] == 1


@pytest.mark.parametrize("cap", ["1.1", "1.0"])
async def test_run_instance_capped_below_1_2_sends_the_old_message(cap: str) -> None:
    version, args = await _run_instance(OldBuildAgent(), cap, _extras())
    assert version == "1.0"
    assert set(args) == {"instance", "request_spec", "alternates", "attempt"}
    assert args["alternates"] == ["h2"]


async def test_run_instance_without_extras_stays_at_1_0() -> None:
    # A caller with nothing to hand over (none of the extras) needs nothing newer than 1.0.
    version, args = await _run_instance(NewBuildAgent(), None, {})
    assert version == "1.0"
    assert set(args) == {"instance", "request_spec", "alternates", "attempt"}


def _levels(hosts: dict[str, releases.Release]) -> ComputeUpgradeLevels:
    """Levels as a refresh that saw ``hosts`` (all live) would leave them."""

    def no_database() -> Any:
        raise AssertionError("the test never refreshes")

    levels = ComputeUpgradeLevels("auto", no_database)
    levels.levels = Levels(releases.CURRENT, hosts)
    return levels


async def test_run_instance_to_a_host_the_levels_have_not_seen_sends_the_old_message() -> None:
    # The cap says 1.2 (only current agents were live at the last refresh), but "h" registered
    # since and may run release 1.0: a 1.2 cast would be rejected and the build lost.
    levels = _levels({"other": releases.CURRENT})
    assert levels.levels.rpc_version_cap == "1.2"
    version, args = await _run_instance(OldBuildAgent(), None, _extras(), levels)
    assert version == "1.0"
    assert set(args) == {"instance", "request_spec", "alternates", "attempt"}


async def test_run_instance_to_a_host_known_at_1_2_carries_the_extras() -> None:
    version, args = await _run_instance(
        NewBuildAgent(), None, _extras(), _levels({"h": releases.CURRENT})
    )
    assert version == "1.2" and args["event_started"] is True
