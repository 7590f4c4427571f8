"""The tiny HTTP endpoint under misbehaving clients: slow, oversized, idle at shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared_objects.runtime.http import HTTPEndpoint, Response, Route


def routes() -> dict[str, Route]:
    return {"/x": lambda: Response(200, b"x\n")}


async def test_a_client_that_never_finishes_its_request_gets_408() -> None:
    async with HTTPEndpoint(routes(), port=0, request_timeout=0.2) as endpoint:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /x HTTP/1.1\r\n")  # and never the blank line
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")


async def test_an_oversized_header_line_gets_431() -> None:
    async with HTTPEndpoint(routes(), port=0) as endpoint:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 431 ")


async def test_query_strings_are_ignored_for_routing() -> None:
    async with HTTPEndpoint(routes(), port=0) as endpoint:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /x?probe=1 HTTP/1.1\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\nx\n")


async def test_stop_does_not_wait_for_idle_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = HTTPEndpoint(routes(), port=0, request_timeout=30)
    accepted = asyncio.Event()
    serve = endpoint._serve

    async def serving(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await serve(reader, writer)

    monkeypatch.setattr(endpoint, "_serve", serving)
    await endpoint.start()
    _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    # The server side has accepted and waits for a request (else stop() has nothing to skip).
    await asyncio.wait_for(accepted.wait(), 5)
    started = time.monotonic()
    await asyncio.wait_for(endpoint.stop(), 5)
    assert time.monotonic() - started < 1.0
    writer.close()
