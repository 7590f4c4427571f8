"""A small asyncio QMP client: JSON over a QEMU monitor's unix socket.

Why our own rather than the QEMU project's ``qemu.qmp``: the driver needs a handful of commands
and events, asyncio-native, with timeouts on everything and its connection errors mapped in one
place; the protocol is a greeting, ``qmp_capabilities``, then one JSON document per line, which
is ~200 lines to own outright and test against a fake server, with no dependency to pin.

Protocol (QEMU's docs/interop/qmp-spec): the server greets with ``{"QMP": {...}}``; the client
must send ``qmp_capabilities`` before anything else; each command may carry an ``id`` that the
reply (``{"return": ...}`` or ``{"error": {"class", "desc"}}``) echoes; events
(``{"event": NAME, "data": {...}, "timestamp": {...}}``) arrive at any time in between.

Usage::

    client = await QMPClient.connect(path, timeout=5)
    status = await client.execute("query-status")
    with client.listen("DEVICE_DELETED", lambda d: d.get("device") == "vol1") as waiter:
        await client.execute("device_del", {"id": "vol1"})
        await waiter.wait(timeout=10)
    await client.close()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from compute_agent.virt.qemu.errors import (
    QMPCommandError,
    QMPConnectionError,
    QMPError,
    QMPTimeout,
)

#: A QMP reply can be large (query-migrate, query-block); asyncio's default line limit is 64 KiB.
_LINE_LIMIT = 4 * 1024 * 1024
#: The kernel's limit of a unix socket path (sun_path) minus the terminating NUL.
_SUN_PATH_MAX = 107

EventMatch = Callable[[dict[str, Any]], bool]


class EventWaiter:
    """Events of one name (optionally matching a predicate on ``data``) seen since creation."""

    def __init__(self, name: str, match: EventMatch | None) -> None:
        self.name = name
        self._match = match
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def _offer(self, event: dict[str, Any]) -> None:
        if event.get("event") != self.name:
            return
        data = event.get("data") or {}
        if self._match is None or self._match(data):
            self._queue.put_nowait(event)

    def _closed(self) -> None:
        self._queue.put_nowait(None)

    async def wait(self, timeout: float) -> dict[str, Any]:
        """The next matching event; QMPTimeout, or QMPConnectionError if the connection ends."""
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError as exc:
            raise QMPTimeout(f"no {self.name} event within {timeout} s") from exc
        if event is None:
            self._queue.put_nowait(None)  # every later wait fails the same way
            raise QMPConnectionError(f"QMP connection closed while waiting for {self.name}")
        return event


class QMPClient:
    """One QMP connection. Build it with ``connect``; ``close`` is idempotent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._waiters: set[EventWaiter] = set()
        #: The last events received, newest last (for diagnostics and tests).
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.greeting: dict[str, Any] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 5.0) -> QMPClient:
        """Connect, read the greeting and negotiate capabilities, all within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await _open_unix(os.fspath(path))
                client = cls(reader, writer)
                try:
                    await client._handshake()
                except BaseException:
                    await client.close()
                    raise
                return client
        except TimeoutError as exc:
            raise QMPTimeout(f"QMP handshake on {path} timed out after {timeout} s") from exc
        except OSError as exc:
            raise QMPConnectionError(f"cannot connect to QMP socket {path}: {exc}") from exc

    async def _handshake(self) -> None:
        greeting = await self._read_message()
        if "QMP" not in greeting:
            raise QMPConnectionError(f"not a QMP greeting: {greeting!r}")
        self.greeting = greeting["QMP"]
        self._reader_task = asyncio.create_task(self._read_loop(), name="qmp-reader")
        await self.execute("qmp_capabilities")

    @property
    def closed(self) -> bool:
        """True once the connection ended (closed by us, by QEMU, or broken)."""
        return self._closed_reason is not None

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        """Run ``command`` and return its ``return`` value; QMPCommandError if QEMU refuses."""
        if self._closed_reason is not None:
            raise QMPConnectionError(f"QMP connection closed ({self._closed_reason})")
        msg_id = f"fleet-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = arguments
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
            reply = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError as exc:
            raise QMPTimeout(f"no reply to {command} within {timeout} s") from exc
        except (ConnectionError, OSError) as exc:
            raise QMPConnectionError(f"QMP connection lost during {command}: {exc}") from exc
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise QMPCommandError(command, reply["error"])
        return reply.get("return")

    @contextlib.contextmanager
    def listen(self, name: str, match: EventMatch | None = None) -> Iterator[EventWaiter]:
        """Collect events ``name`` from now on (enter it *before* the command that causes them)."""
        waiter = EventWaiter(name, match)
        if self._closed_reason is not None:
            waiter._closed()
        self._waiters.add(waiter)
        try:
            yield waiter
        finally:
            self._waiters.discard(waiter)

    async def close(self) -> None:
        """Close the connection; pending commands and event waits fail with QMPConnectionError."""
        self._shutdown("closed by client")
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def _read_message(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise QMPConnectionError(f"QMP message too long: {exc}") from exc
        if not line:
            raise QMPConnectionError("QMP connection closed by QEMU")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QMPConnectionError(f"bad QMP message {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise QMPConnectionError(f"bad QMP message {line[:200]!r}")
        return message

    async def _read_loop(self) -> None:
        reason = "closed by QEMU"
        try:
            while True:
                message = await self._read_message()
                if "event" in message:
                    self.recent_events.append(message)
                    for waiter in list(self._waiters):
                        waiter._offer(message)
                    continue
                future = self._pending.get(str(message.get("id")))
                if future is not None and not future.done():
                    future.set_result(message)
        except QMPError as exc:
            reason = str(exc)
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        finally:
            self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(QMPConnectionError(f"QMP connection ended: {reason}"))
        for waiter in self._waiters:
            waiter._closed()


async def _open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a unix socket; a path too long for sun_path goes through /proc/self/fd."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return await asyncio.open_unix_connection(path, limit=_LINE_LIMIT)
    # Deep state directories exceed the 107-byte limit; the directory's fd gives a short alias.
    directory, name = os.path.split(path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{dir_fd}/{name}"
        return await asyncio.open_unix_connection(short, limit=_LINE_LIMIT)
    finally:
        os.close(dir_fd)
