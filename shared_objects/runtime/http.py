"""A tiny HTTP/1.1 server on asyncio streams, for the metrics and health endpoints only.

It answers ``GET``/``HEAD`` on a fixed set of paths, one request per connection, and nothing
else: no keep-alive, no request bodies, no TLS. It runs on the service's own event loop, which is
the point of ``/healthz``: if the loop is stuck, the endpoint stops answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

from shared_objects.runtime.log import get_logger

__all__ = ["HTTPEndpoint", "Response", "Route"]

log = get_logger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_HEADER_LINES = 100
_LINE_LIMIT = 8192


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    """What a route returns: status, body and its media type."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]


class HTTPEndpoint:
    """Serve ``routes`` (path -> handler) on ``host:port``; ``port=0`` picks a free port.

    Use as ``async with HTTPEndpoint(...) as endpoint:``; ``endpoint.port`` is the bound port.
    Handlers are plain functions run on the loop: they must be quick and never block.
    """

    def __init__(
        self,
        routes: Mapping[str, Route],
        host: str = "127.0.0.1",
        port: int = 0,
        request_timeout: float = 5.0,
    ) -> None:
        self._routes = dict(routes)
        self._host = host
        self._port = port
        self._timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port actually bound (differs from the requested one when that was 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("endpoint is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9464``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=_LINE_LIMIT
        )

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._connections):
            writer.close()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    method, path = await self._read_request(reader)
            except TimeoutError:
                response, method = Response(408, b"request timeout\n"), "GET"
            except _BadRequest as exc:
                response, method = Response(exc.status, f"{exc}\n".encode()), "GET"
            else:
                response = self._dispatch(method, path)
            await self._write(writer, response, head_only=method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        try:
            request_line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
            for _ in range(_MAX_HEADER_LINES):
                if (await reader.readuntil(b"\n")).strip() == b"":
                    break
            else:
                raise _BadRequest(431, "too many header lines")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "header line too long") from None
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest(400, "malformed request line")
        method, target = parts[0], parts[1]
        return method, target.split("?", 1)[0]

    def _dispatch(self, method: str, path: str) -> Response:
        route = self._routes.get(path)
        if route is None:
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n")
        try:
            return route()
        except Exception:
            # A broken handler must not take the endpoint down; the traceback goes to the log.
            log.exception("http handler failed", path=path)
            return Response(500, b"internal error\n")

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
        reason = _REASONS.get(response.status, "Unknown")
        head = (
            f"HTTP/1.1 {response.status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n"
            "Cache-Control: no-store\r\n\r\n"
        ).encode("latin-1")
        writer.write(head if head_only else head + response.body)
        await writer.drain()


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
