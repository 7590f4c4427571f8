"""Acceptance over the real RabbitMQ and PostgreSQL: an agent process without database access
works with objects through a conductor process (issue 3, a, b, d)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from objects_support import ConductorProcess, fleet_env, wait_for_conductor
from sqlalchemy import select

from conductor.db import models
from conductor.db.session import Database
from conductor.testing import snapshot
from shared_objects import exception, releases
from shared_objects.base import obj_tree_get_versions
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance
from shared_objects.rpc_clients.conductor import ConductorAPI

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("agent_peer.py")


async def _run_agent(env: dict[str, str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PEER),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_agent_process_uses_objects_through_the_conductor(
    conductor_process: ConductorProcess,
    agent_api: ConductorAPI,
    conductor_url: str,
    control_exchange: str,
    conductor_topic: str,
) -> None:
    await wait_for_conductor(agent_api)
    report = await _run_agent(
        fleet_env(
            FLEET_TRANSPORT_URL=conductor_url,
            FLEET_CONTROL_EXCHANGE=control_exchange,
            FLEET_LOG_LEVEL="warning",
            AGENT_TOPIC=conductor_topic,
        )
    )
    assert report["ping"] == "hello"
    assert report["flavor_name"] == "m1.tiny"
    assert report["flavor_loaded_without_expected_attrs"] is False

    # Only the key and the two changed fields travelled for the save.
    (sent,) = report["save_sent"]
    assert sent["name"] == "Instance"
    assert sent["data"] == ["progress", "task_state", "uuid"]
    assert sent["changes"] == ["progress", "task_state"]
    assert report["after_save"] == {"changes": [], "updated_at_set": True}
    assert report["cas_error"] == "shared_objects.exception.UnexpectedTaskStateError"

    first, second = report["uuids"]
    assert report["listed"] == sorted([first, second])
    assert report["listed_after_delete"] == [first]
    assert report["victim_deleted"] is True

    # Every object it received is at the version it asked for.
    assert report["received"], "the agent received no objects"
    for received in report["received"]:
        assert received["version"] == received["asked"], received
    assert report["backports"] == 0

    # The database holds what the agent did.
    database = Database(conductor_process.database_url)
    try:
        async with database.engine.connect() as conn:
            rows = {r.uuid: r for r in (await conn.execute(select(models.Instance))).all()}
    finally:
        await database.dispose()
    assert rows[first].task_state == "spawning" and rows[first].progress == 10
    assert rows[first].deleted is False and rows[second].deleted is True
    assert rows[first].flavor["name"] == "m1.tiny"
    # The conductor registered itself (service version from the release table).
    async with Database(conductor_process.database_url).engine.connect() as conn:
        services = (await conn.execute(select(models.Service))).all()
    assert [(s.binary, s.version) for s in services] == [
        (releases.BINARY_CONDUCTOR, releases.SERVICE_VERSION)
    ]


async def test_twenty_concurrent_saves_over_rpc_exactly_one_wins(
    conductor_process: ConductorProcess,
    agent_api: ConductorAPI,
) -> None:
    await wait_for_conductor(agent_api)
    ctxt = RequestContext()
    flavor = Flavor(ctxt, name="m1", vcpus=1, memory_mb=64, root_gb=1)
    await flavor.create()
    inst = Instance(ctxt, name="vm", host="h", node="n", flavor=flavor, vm_state="building")
    await inst.create()
    copies = [await Instance.get_by_uuid(ctxt, inst.uuid) for _ in range(20)]
    for copy in copies:
        copy.task_state = "spawning"
    results = await asyncio.wait_for(
        asyncio.gather(*(c.save(expected_task_state=None) for c in copies), return_exceptions=True),
        timeout=60,
    )
    assert sum(r is None for r in results) == 1, results
    assert sum(isinstance(r, exception.UnexpectedTaskStateError) for r in results) == 19, results


async def test_hostile_calls_over_rpc_get_clear_errors_and_change_nothing(
    conductor_process: ConductorProcess,
    agent_api: ConductorAPI,
) -> None:
    await wait_for_conductor(agent_api)
    ctxt = RequestContext()
    flavor = Flavor(ctxt, name="m1", vcpus=1, memory_mb=64, root_gb=1)
    await flavor.create()
    inst = Instance(ctxt, name="vm", host="h", node="n", flavor=flavor, vm_state="active")
    await inst.create()
    database = Database(conductor_process.database_url)
    before = await snapshot(database)
    manifest = obj_tree_get_versions("Instance")
    good = Instance(uuid=inst.uuid, name="evil").obj_to_primitive()
    client = agent_api.client
    class_calls: list[tuple[dict[str, Any], type[Exception]]] = [
        (
            {"objname": "Nope", "objmethod": "get_by_uuid", "object_versions": {"Nope": "1.0"}},
            exception.UnknownObject,
        ),
        (
            {"objname": "Instance", "objmethod": "obj_reset_changes"},
            exception.ObjectMethodNotAllowed,
        ),
        ({"objname": "Instance", "objmethod": "__class__"}, exception.ObjectMethodNotAllowed),
        ({"objname": "Instance", "objmethod": "_from_db_object"}, exception.ObjectMethodNotAllowed),
        ({"objname": "Instance", "objmethod": "__init__"}, exception.ObjectMethodNotAllowed),
        (
            {
                "objname": "Instance",
                "objmethod": "get_by_uuid",
                "object_versions": {**manifest, "Instance": "2.0"},
            },
            exception.UnsupportedObjectVersion,
        ),
        (
            {"objname": "Instance", "objmethod": "get_by_uuid", "args": [7]},
            exception.InvalidObjectCall,
        ),
        (
            {"objname": "Instance", "objmethod": "get_by_uuid", "args": {"a": 1}},
            exception.InvalidObjectCall,
        ),
    ]
    try:
        for call, error in class_calls:
            call = {"object_versions": manifest, "args": [inst.uuid], "kwargs": {}, **call}
            with pytest.raises(error):
                await client.call(ctxt, "object_class_action_versions", **call)
        action_calls: list[tuple[dict[str, Any], type[Exception]]] = [
            ({"objinst": good, "objmethod": "obj_reset_changes"}, exception.ObjectMethodNotAllowed),
            (
                {"objinst": {"versioned_object.name": "Instance"}, "objmethod": "save"},
                exception.InvalidObjectPrimitive,
            ),
            (
                {"objinst": {**good, "versioned_object.version": "2.0"}, "objmethod": "save"},
                exception.UnsupportedObjectVersion,
            ),
            (
                {"objinst": good, "objmethod": "save", "kwargs": {"expected_vm_state": {"x": 1}}},
                exception.InvalidObjectCall,
            ),
            ({"objinst": 42, "objmethod": "destroy"}, exception.InvalidObjectCall),
        ]
        for call, error in action_calls:
            call = {"args": [], "kwargs": {}, **call}
            with pytest.raises(error):
                await client.call(ctxt, "object_action", **call)
        # Still serving normal work; nothing changed in the database.
        assert await agent_api.ping(ctxt, "still here") == "still here"
        assert (await Instance.get_by_uuid(ctxt, inst.uuid)).name == "vm"
        assert await snapshot(database) == before
        assert conductor_process.process.returncode is None
    finally:
        await database.dispose()
