"""Caller identity: the server hands handlers the broker-validated AMQP user_id, never anything
from the message body."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import RPCClient, RPCServer, Target, expose, get_transport
from shared_objects.testing.broker import BrokerJanitor, vhost_of, vhost_path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl"),
]


class WhoAmI:
    @expose
    async def whoami(self, ctxt: RequestContext) -> dict[str, object]:
        return {"caller": ctxt.caller, "user_id": ctxt.user_id, "extra": ctxt.extra}


async def _ctl(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()


@pytest.fixture
async def host_user(amqp_url: str) -> AsyncIterator[tuple[str, str]]:
    """A broker user of our own, like a compute host would have (removed afterwards)."""
    name, password = f"fleet-test-host-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await _ctl("add_user", name, password)
    try:
        await _ctl("set_permissions", "-p", vhost_of(amqp_url), name, ".*", ".*", ".*")
        yield name, password
    finally:
        await _ctl("delete_user", name)


async def test_caller_is_the_authenticated_broker_user_not_the_body(
    amqp_url: str,
    control_exchange: str,
    unique_topic: str,
    janitor: BrokerJanitor,
    host_user: tuple[str, str],
) -> None:
    name, password = host_user
    janitor.server_topology(control_exchange, unique_topic, "s1")
    server_cfg = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    host_cfg = MessagingConfig(
        transport_url=f"rabbit://{name}:{password}@127.0.0.1:5672/{vhost_path(amqp_url)}",
        control_exchange=control_exchange,
    )
    async with (
        get_transport(server_cfg) as server_t,
        get_transport(host_cfg) as host_t,
        RPCServer(server_t, Target(topic=unique_topic, server="s1"), [WhoAmI()]),
    ):
        assert host_t.user_id == name
        client = RPCClient(host_t, Target(topic=unique_topic), timeout=5)
        # A context claiming another identity: the claim stays data, the caller is the login.
        claimed = {"user": "admin", "caller": "conductor", "request_id": "req-1"}
        result = await client.call(claimed, "whoami")
        assert result["caller"] == name
        assert result["user_id"] == "admin"
        assert result["extra"] == {"caller": "conductor"}
