"""Fixtures for object tests over the real RabbitMQ: a conductor subprocess on a fresh
PostgreSQL database, and an agent-side conductor client in the test process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from objects_support import ConductorProcess, fleet_env

from conductor.db import migration
from conductor.testing import indirection
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import get_transport
from shared_objects.testing.broker_logins import BrokerLogins

BIN = Path(sys.executable).parent


@pytest.fixture
def conductor_url(amqp_url: str, broker_logins: BrokerLogins | None) -> str:
    """A conductor's login, for the conductor and for this process and its agent peer alike:
    these tests are about the object plumbing, which a conductor may use unrestricted (what an
    agent's login may do is tests/security's and tests/integration/db/ownership/'s)."""
    if broker_logins is None:
        return amqp_url
    return broker_logins.url_for(broker_logins.conductor_login("1"))


@pytest.fixture
def messaging_config(conductor_url: str, control_exchange: str) -> MessagingConfig:
    cfg = MessagingConfig()
    cfg.transport_url = conductor_url
    cfg.control_exchange = control_exchange
    return cfg


@pytest.fixture
def conductor_topic(unique_topic: str) -> str:
    """Queues are named by topic only: a unique topic keeps other tests' conductors away."""
    return f"conductor-{unique_topic}"


@pytest.fixture
async def agent_api(
    messaging_config: MessagingConfig, conductor_topic: str
) -> AsyncIterator[ConductorAPI]:
    """This process as an agent: remotables go over RabbitMQ to the conductor."""
    transport = get_transport(messaging_config, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
    async with transport:
        api = ConductorAPI(transport, timeout=30.0, topic=conductor_topic)
        with indirection(api):
            yield api


@pytest.fixture
async def conductor_process(
    pg_database_url: str,
    conductor_url: str,
    control_exchange: str,
    conductor_topic: str,
    tmp_path: Path,
) -> AsyncIterator[ConductorProcess]:
    """A `conductor` subprocess serving a freshly migrated PostgreSQL database."""
    await migration.upgrade(pg_database_url)
    env = fleet_env(
        FLEET_TRANSPORT_URL=conductor_url,
        FLEET_CONTROL_EXCHANGE=control_exchange,
        FLEET_DATABASE_URL=pg_database_url,
        FLEET_HOST=f"conductor-{uuid.uuid4().hex[:6]}",
        FLEET_LOG_FORMAT="json",
        FLEET_LOG_LEVEL="info",
        # No heartbeat during a test: database snapshots must compare equal.
        FLEET_SERVICE__REPORT_INTERVAL="600",
        FLEET_SERVICE__SERVICE_DOWN_TIME="1200",
    )
    log_path = tmp_path / "conductor.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "conductor"),
            "--topic",
            conductor_topic,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield ConductorProcess(proc, env, log_path, pg_database_url)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
