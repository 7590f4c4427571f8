"""The fault-injection TCP proxy: pass-through, latency, blackhole + heal, resets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from shared_objects.testing import ProxyMode, TcpProxy


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A loopback echo server standing in for the broker."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the proxy resets connections on purpose in these tests
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _roundtrip(port: int, payload: bytes, within: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), within)
    finally:
        writer.close()


async def test_pass_mode_forwards_bytes_both_ways(echo_port: int) -> None:
    async with TcpProxy(echo_port) as proxy:
        payload = b"x" * 200_000
        assert await _roundtrip(proxy.port, payload) == payload
        assert proxy.accepted == 1
        assert proxy.bytes_forwarded == 2 * len(payload)


async def test_latency_mode_delays_each_direction(echo_port: int) -> None:
    async with TcpProxy(echo_port) as proxy:
        proxy.set_latency(100)
        assert proxy.mode is ProxyMode.LATENCY
        started = time.monotonic()
        assert await _roundtrip(proxy.port, b"ping") == b"ping"
        elapsed = time.monotonic() - started
        assert 0.2 <= elapsed < 1.5


async def test_blackhole_holds_traffic_until_heal(echo_port: int) -> None:
    async with TcpProxy(echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"before")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(6), 2.0) == b"before"

            proxy.blackhole()
            writer.write(b"during")
            await writer.drain()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(6), 0.5)

            proxy.heal()
            assert await asyncio.wait_for(reader.readexactly(6), 2.0) == b"during"
        finally:
            writer.close()


async def test_blackhole_keeps_new_connections_from_the_upstream(echo_port: int) -> None:
    async with TcpProxy(echo_port) as proxy:
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            await _roundtrip(proxy.port, b"hello", within=0.5)
        proxy.heal()
        assert await _roundtrip(proxy.port, b"hello") == b"hello"


async def test_reset_aborts_open_connections_with_rst(echo_port: int) -> None:
    async with TcpProxy(echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"a")
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 2.0)
            proxy.reset()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)
        finally:
            writer.close()
        assert proxy.active_connections == 0
        # reset() is an action, not a mode: new connections work again.
        assert await _roundtrip(proxy.port, b"again") == b"again"


async def test_reset_mode_refuses_new_connections_until_heal(echo_port: int) -> None:
    async with TcpProxy(echo_port) as proxy:
        proxy.set_mode(ProxyMode.RESET)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"hello")
        proxy.heal()
        assert await _roundtrip(proxy.port, b"hello") == b"hello"


def test_proxy_refuses_non_loopback_addresses() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy(5672, upstream_host="10.0.0.1")
