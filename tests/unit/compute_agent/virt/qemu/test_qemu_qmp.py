"""The QMP client against a fake QMP server on a unix socket (no QEMU needed)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from compute_agent.virt.qemu.errors import (
    QMPCommandError,
    QMPConnectionError,
    QMPTimeout,
)
from compute_agent.virt.qemu.qmp import QMPClient

Handler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


class FakeQMPServer:
    """Greets, requires qmp_capabilities first, then hands each command to ``handler``."""

    def __init__(self, path: Path, handler: Handler, greeting: bytes | None = None) -> None:
        self.path = path
        self.handler = handler
        self.greeting = (
            greeting or b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}\n'
        )
        self.received: list[dict[str, Any]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(self.greeting)
        await writer.drain()
        while line := await reader.readline():
            message = json.loads(line)
            self.received.append(message)
            if message["execute"] == "qmp_capabilities":
                send(writer, {"return": {}, "id": message.get("id")})
                continue
            await self.handler(message, writer)

    async def close_clients(self) -> None:
        for writer in self.writers:
            writer.close()

    async def stop(self) -> None:
        await self.close_clients()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def echo_handler(message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
    cmd = message["execute"]
    if cmd == "query-status":
        send(writer, {"return": {"status": "running", "running": True}, "id": message["id"]})
    elif cmd == "device_del":
        # As QEMU does: the event may come before the command's reply.
        device = message["arguments"]["id"]
        send(writer, {"event": "DEVICE_DELETED", "data": {"path": "/machine/x/virtio-backend"}})
        send(writer, {"event": "DEVICE_DELETED", "data": {"device": device, "path": "/x"}})
        send(writer, {"return": {}, "id": message["id"]})
    elif cmd == "silent":
        pass  # never answers
    else:
        send(
            writer,
            {"error": {"class": "CommandNotFound", "desc": f"no {cmd}"}, "id": message["id"]},
        )


@pytest.fixture
def sock_dir() -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmp", dir="/tmp") as tmp:
        yield Path(tmp)


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[FakeQMPServer]:
    srv = FakeQMPServer(sock_dir / "qmp.sock", echo_handler)
    await srv.start()
    yield srv
    await srv.stop()


async def test_negotiates_capabilities_first_and_returns_results(server: FakeQMPServer) -> None:
    client = await QMPClient.connect(server.path, timeout=2)
    try:
        assert client.greeting["version"]["qemu"]["major"] == 7
        assert await client.execute("query-status") == {"status": "running", "running": True}
        assert [m["execute"] for m in server.received] == ["qmp_capabilities", "query-status"]
        ids = [m["id"] for m in server.received]
        assert len(set(ids)) == 2 and all(ids)
    finally:
        await client.close()


async def test_an_error_reply_raises_with_qemus_class(server: FakeQMPServer) -> None:
    client = await QMPClient.connect(server.path, timeout=2)
    try:
        with pytest.raises(QMPCommandError) as info:
            await client.execute("nope")
        assert info.value.error_class == "CommandNotFound"
        assert "no nope" in str(info.value)
        # The connection is still usable after an error.
        assert (await client.execute("query-status"))["status"] == "running"
    finally:
        await client.close()


async def test_listener_sees_events_that_arrive_before_the_reply(server: FakeQMPServer) -> None:
    client = await QMPClient.connect(server.path, timeout=2)
    try:
        match = lambda data: data.get("device") == "disk-1"  # noqa: E731
        with client.listen("DEVICE_DELETED", match) as waiter:
            await client.execute("device_del", {"id": "disk-1"})
            event = await waiter.wait(timeout=1)
        assert event["data"]["device"] == "disk-1"  # the backend-path event was filtered out
        assert len(client.recent_events) == 2
    finally:
        await client.close()


async def test_replies_are_matched_by_id_out_of_order(sock_dir: Path) -> None:
    held: list[dict[str, Any]] = []

    async def handler(message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        held.append(message)
        if len(held) == 2:  # answer the second first
            for m in reversed(held):
                send(writer, {"return": m["execute"], "id": m["id"]})

    srv = FakeQMPServer(sock_dir / "q.sock", handler)
    await srv.start()
    client = await QMPClient.connect(srv.path, timeout=2)
    try:
        first, second = await asyncio.gather(client.execute("a"), client.execute("b"))
        assert (first, second) == ("a", "b")
    finally:
        await client.close()
        await srv.stop()


async def test_command_and_event_timeouts(server: FakeQMPServer) -> None:
    client = await QMPClient.connect(server.path, timeout=2)
    try:
        with pytest.raises(QMPTimeout, match="no reply to silent"):
            await client.execute("silent", timeout=0.1)
        with client.listen("NEVER") as waiter, pytest.raises(QMPTimeout):
            await waiter.wait(timeout=0.05)
    finally:
        await client.close()


async def test_connection_loss_fails_pending_commands_and_waiters(server: FakeQMPServer) -> None:
    client = await QMPClient.connect(server.path, timeout=2)
    try:
        with client.listen("SHUTDOWN") as waiter:
            pending = asyncio.create_task(client.execute("silent", timeout=5))
            await asyncio.sleep(0.05)
            await server.close_clients()
            with pytest.raises(QMPConnectionError):
                await pending
            with pytest.raises(QMPConnectionError):
                await waiter.wait(timeout=1)
        assert client.closed
        with pytest.raises(QMPConnectionError):
            await client.execute("query-status")
    finally:
        await client.close()
        await client.close()  # idempotent


async def test_missing_socket_and_bad_greeting(sock_dir: Path) -> None:
    with pytest.raises(QMPConnectionError, match="cannot connect"):
        await QMPClient.connect(sock_dir / "absent.sock", timeout=1)
    srv = FakeQMPServer(sock_dir / "bad.sock", echo_handler, greeting=b'{"hello": 1}\n')
    await srv.start()
    try:
        with pytest.raises(QMPConnectionError, match="not a QMP greeting"):
            await QMPClient.connect(srv.path, timeout=1)
    finally:
        await srv.stop()


async def test_silent_server_times_out_the_handshake(sock_dir: Path) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    srv = await asyncio.start_unix_server(mute, path=str(sock_dir / "mute.sock"))
    try:
        with pytest.raises(QMPTimeout, match="handshake"):
            await QMPClient.connect(sock_dir / "mute.sock", timeout=0.2)
    finally:
        srv.close()


async def test_socket_paths_longer_than_sun_path_still_connect(sock_dir: Path) -> None:
    deep = sock_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    # Bind through a short relative name, as QEMU does (its cwd is the guest directory).
    alias = sock_dir / "alias"
    alias.symlink_to(deep)
    srv = FakeQMPServer(alias / "qmp.sock", echo_handler)
    await srv.start()
    path = deep / "qmp.sock"
    assert len(str(path)) > 107
    client = await QMPClient.connect(path, timeout=2)
    try:
        assert (await client.execute("query-status"))["status"] == "running"
    finally:
        await client.close()
        await srv.stop()
