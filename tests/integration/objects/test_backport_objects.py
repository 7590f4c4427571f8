"""Acceptance (c): a conductor that knows a newer minor answers an agent process that knows only
the older one at the older version, the new field dropped by obj_make_compatible."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from objects_support import fleet_env, wait_for_conductor

from conductor.db import migration
from conductor.service import ConductorService
from conductor.testing import (
    CURRENT_INSTANCE_VERSION,
    NEWER_INSTANCE_FIELD,
    isolated_registry,
    register_newer_instance,
)
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.config import FleetConfig, MessagingConfig

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("agent_peer.py")


@pytest.fixture
async def newer_conductor(
    pg_database_url: str, messaging_config: MessagingConfig, conductor_topic: str
) -> AsyncIterator[ConductorService]:
    """A conductor in this process with a test-only Instance 1.1 registered."""
    await migration.upgrade(pg_database_url)
    cfg = FleetConfig(host="newer-conductor", messaging=messaging_config)
    cfg.database.url = pg_database_url
    cfg.service.report_interval = 600
    with isolated_registry():
        register_newer_instance()
        service = ConductorService(cfg, topic=conductor_topic)
        await service.start()
        try:
            yield service
        finally:
            await service.stop(grace=5)


async def test_older_agent_receives_the_older_version(
    newer_conductor: ConductorService,
    agent_api: ConductorAPI,
    conductor_url: str,
    control_exchange: str,
    conductor_topic: str,
) -> None:
    await wait_for_conductor(agent_api)
    # Seed through the conductor's own database access (the 1.1 class is registered here).
    ctxt = RequestContext()
    async with newer_conductor.database.request(ctxt):
        flavor = Flavor(ctxt, name="m1", vcpus=1, memory_mb=64, root_gb=1)
        await flavor.create()
        inst = Instance(ctxt, name="vm", host="hb", node="n", flavor=flavor, vm_state="active")
        await inst.create()

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PEER),
        env=fleet_env(
            FLEET_TRANSPORT_URL=conductor_url,
            FLEET_CONTROL_EXCHANGE=control_exchange,
            FLEET_LOG_LEVEL="warning",
            AGENT_READ_UUID=inst.uuid,
            AGENT_TOPIC=conductor_topic,
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])

    assert report["instance_version"] == CURRENT_INSTANCE_VERSION
    assert NEWER_INSTANCE_FIELD not in report["instance_fields"]
    assert "flavor" in report["instance_fields"]
    assert report["listed"] == [inst.uuid]
    instances = [r for r in report["received"] if r["name"] == "Instance"]
    assert len(instances) == 2  # the single get and the one list element
    assert all(r["version"] == CURRENT_INSTANCE_VERSION for r in instances)
    assert all(NEWER_INSTANCE_FIELD not in r["fields"] for r in instances)
    assert report["backports"] == 0
