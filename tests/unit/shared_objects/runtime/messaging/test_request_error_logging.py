"""A request the server answers with an expected error (a missing instance, a refusal, no valid
host) is logged at INFO/WARNING without a traceback and not counted as a fault; anything else
is an ERROR with its traceback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog.testing

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MemoryBroker,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)

TOPIC = "errors"


class Endpoint:
    @expose
    async def missing(self, ctxt: RequestContext) -> None:
        raise exception.InstanceNotFound(instance_id="i-1")

    @expose
    async def refused(self, ctxt: RequestContext) -> None:
        raise exception.Forbidden(caller="alice", action="delete", target="i-1")

    @expose
    async def no_host(self, ctxt: RequestContext) -> None:
        raise exception.NoValidHost(placed="", reasons="h1: not enough RAM")

    @expose
    async def broken(self, ctxt: RequestContext) -> None:
        raise ZeroDivisionError("a bug")


@pytest.fixture
async def client() -> AsyncIterator[tuple[RPCClient, RPCServer]]:
    broker = MemoryBroker()

    def config(user: str) -> MessagingConfig:
        return MessagingConfig(transport_url=f"memory://{user}@unit/", control_exchange="x")

    server_t = get_transport(config("host1"), memory_broker=broker)
    client_t = get_transport(
        config("alice"),
        allowed_remote_exmods=[*exception.ALLOWED_REMOTE_EXMODS, "builtins"],
        memory_broker=broker,
    )
    async with server_t, client_t:
        server = RPCServer(server_t, Target(topic=TOPIC, server="s1"), [Endpoint()])
        async with server:
            yield RPCClient(client_t, Target(topic=TOPIC), timeout=2.0), server


@pytest.mark.parametrize(
    ("method", "level"),
    [("missing", "info"), ("refused", "warning"), ("no_host", "warning")],
)
async def test_expected_request_errors_are_one_line_without_traceback(
    client: tuple[RPCClient, RPCServer], method: str, level: str
) -> None:
    rpc, server = client
    with structlog.testing.capture_logs() as logs, pytest.raises(Exception):  # noqa: B017
        await rpc.call(RequestContext(), method)
    failures = [e for e in logs if e["event"].startswith("rpc_")]
    assert [e["event"] for e in failures] == ["rpc_request_failed"], logs
    entry: dict[str, Any] = failures[0]
    assert entry["log_level"] == level
    assert "exc_info" not in entry
    assert entry["method"] == method
    # Counted as the request's fault (or a refusal), never as the server's "error".
    outcome = "forbidden" if method == "refused" else "client_error"
    assert server.stats()["calls"] == {f"{method}:{outcome}": 1}


async def test_unexpected_errors_are_errors_with_traceback(
    client: tuple[RPCClient, RPCServer],
) -> None:
    rpc, _ = client
    with structlog.testing.capture_logs() as logs, pytest.raises(ZeroDivisionError):
        await rpc.call(RequestContext(), "broken")
    [entry] = [e for e in logs if e["event"] == "rpc_handler_failed"]
    assert entry["log_level"] == "error"
    assert isinstance(entry["exc_info"], ZeroDivisionError)
