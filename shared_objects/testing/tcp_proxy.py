"""An asyncio TCP proxy on loopback for network fault injection (latency, partition, reset).

Put it between one peer and the broker and point that peer's transport URL at the proxy::

    async with TcpProxy(upstream_port=5672) as proxy:
        url = proxy.url()                # rabbit://guest:guest@127.0.0.1:<proxy.port>/
        proxy.set_latency(50)            # +50 ms each way
        proxy.blackhole()                # partition: bytes stop flowing, sockets stay open
        proxy.heal()                     # back to pass-through; held bytes flow again
        proxy.reset()                    # RST every open connection (new ones still work)
        proxy.set_mode(ProxyMode.RESET)  # RST every open and every new connection until heal()

The blackhole behaves like a real partition: nothing is dropped or answered, the kernel buffers
fill up, and connections opened meanwhile are accepted but never reach the upstream until the
proxy heals. Peers only notice through their own timeouts (e.g. AMQP heartbeats).

``tc netem`` and toxiproxy are not available on the development machines, hence this module.
It only ever listens on and connects to loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["ProxyMode", "TcpProxy"]

_CHUNK = 64 * 1024


class ProxyMode(enum.Enum):
    """What the proxy does with traffic."""

    PASS = "pass"
    LATENCY = "latency"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass(eq=False)
class _Link:
    """One proxied client connection and its upstream connection."""

    client: asyncio.StreamWriter
    handler: asyncio.Task[object] | None
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _require_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"TcpProxy only works on loopback addresses, not {host!r}")


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close a connection so that the peer sees a TCP RST, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forward TCP connections from 127.0.0.1:<ephemeral> to an upstream loopback port."""

    def __init__(
        self,
        upstream_port: int = 5672,
        *,
        upstream_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        """Prepare a proxy; ``listen_port=0`` picks a free port at ``start()``."""
        _require_loopback(upstream_host)
        _require_loopback(listen_host)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._mode = ProxyMode.PASS
        self._latency = 0.0
        # Set while traffic may flow; cleared for a blackhole.
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Connections accepted since start (for assertions such as "the peer reconnected").
        self.accepted = 0
        #: Payload bytes forwarded in either direction.
        self.bytes_forwarded = 0

    # -- properties ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (valid after ``start()``)."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def mode(self) -> ProxyMode:
        """The current mode."""
        return self._mode

    @property
    def active_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "") -> str:
        """A ``rabbit://`` transport URL that goes through this proxy."""
        return f"rabbit://{user}:{password}@{self.listen_host}:{self.port}/{vhost}"

    # -- control -------------------------------------------------------------------------------

    def set_mode(self, mode: ProxyMode, latency_ms: float = 0.0) -> None:
        """Switch mode; ``latency_ms`` is the delay added in each direction in LATENCY mode."""
        self._mode = mode
        self._latency = latency_ms / 1000.0 if mode is ProxyMode.LATENCY else 0.0
        if mode is ProxyMode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is ProxyMode.RESET:
            self.reset()

    def heal(self) -> None:
        """Back to plain pass-through; bytes held by a blackhole flow on."""
        self.set_mode(ProxyMode.PASS)

    def set_latency(self, ms: float) -> None:
        """Delay every chunk by ``ms`` milliseconds in each direction (no reordering)."""
        self.set_mode(ProxyMode.LATENCY, ms)

    def blackhole(self) -> None:
        """Silently stop forwarding in both directions, keeping every socket open."""
        self.set_mode(ProxyMode.BLACKHOLE)

    def reset(self) -> None:
        """Abort every open connection with a TCP RST on both sides (mode unchanged)."""
        for link in list(self._links):
            self._drop(link, rst=True)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await asyncio.start_server(self._handle, self.listen_host, self._listen_port)

    async def stop(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
        links = list(self._links)
        for link in links:
            self._drop(link, rst=False)
            if link.handler is not None:
                link.handler.cancel()
        tasks: list[asyncio.Task[Any]] = [task for link in links for task in link.tasks]
        tasks += [link.handler for link in links if link.handler is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- forwarding ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client=writer, handler=asyncio.current_task())
        self._links.add(link)
        try:
            if self._mode is ProxyMode.RESET:
                return
            # A partition also stops new connections from reaching the upstream.
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return  # upstream down: the client sees its connection closed
            link.upstream = up_writer
            if link not in self._links:  # reset while we were connecting
                _abort_with_rst(up_writer)
                return
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._drop(link, rst=self._mode is ProxyMode.RESET)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy one direction; chunks go through a queue so latency delays, never serialises."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            while True:
                await self._flowing.wait()
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                queue.put_nowait((time.monotonic() + self._latency, data))
        except asyncio.CancelledError:
            sender.cancel()
            raise
        # Orderly EOF: let already-read bytes go out before the link is closed.
        queue.put_nowait((0.0, b""))
        try:
            await asyncio.wait_for(sender, 5.0)
        except (TimeoutError, OSError):
            sender.cancel()

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Bytes read just before a partition are held, not delivered, until it heals.
            await self._flowing.wait()
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return
            self.bytes_forwarded += len(data)

    def _drop(self, link: _Link, *, rst: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for side in (link.client, link.upstream):
            if side is None:
                continue
            if rst:
                _abort_with_rst(side)
            else:
                side.close()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
