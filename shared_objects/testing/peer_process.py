"""Drive a helper process that speaks JSON lines: commands on stdin, events/replies on stdout.

Used for peers that must not share the test's process (an oslo.messaging peer with its own
transport, an RPC server that a test SIGKILLs)::

    async with PeerProcess([sys.executable, "peer.py", "server"], name="oslo-server") as peer:
        await peer.wait_event(lambda e: e.get("event") == "ready", within=30)
        reply = await peer.request({"op": "call", ...}, within=15)   # matched by "id"
        ...                                                           # killed at exit

Conventions: every stdout line is one JSON object; replies to ``request()`` carry the same
``"id"``; closing stdin asks the peer to exit; stderr goes to a temp file that is quoted in
every error message, so a failing test shows why the peer misbehaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import tempfile
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

__all__ = ["PeerError", "PeerProcess"]

Event = dict[str, Any]


class PeerError(RuntimeError):
    """The peer exited, printed garbage, or did not answer in time."""


class PeerProcess:
    """One JSON-lines helper process, always killed by its owner."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "peer",
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        """Prepare (not start) the process; ``env`` entries are added to ``os.environ``."""
        self.argv = list(argv)
        self.name = name
        self._env = {**os.environ, **(env or {})}
        self._cwd = cwd
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = tempfile.TemporaryFile()
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._eof = False
        #: Every event line received so far, in order (replies to requests included).
        self.events: list[Event] = []

    @property
    def pid(self) -> int:
        """The process id."""
        if self._proc is None:
            raise PeerError(f"{self.name} not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended."""
        return None if self._proc is None else self._proc.returncode

    async def start(self) -> None:
        """Spawn the process and start collecting its stdout lines."""
        if self._proc is not None:
            raise PeerError(f"{self.name} already started (pid {self._proc.pid})")
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            env=self._env,
            cwd=self._cwd,
            limit=16 * 1024 * 1024,
            # Own process group, so kill() also takes any children the peer started.
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read_stdout())

    async def wait_event(self, predicate: Callable[[Event], bool], within: float) -> Event:
        """The first event (already seen or future) matching ``predicate``."""
        found = await self.wait_events(predicate, 1, within)
        return found[0]

    async def wait_events(
        self, predicate: Callable[[Event], bool], count: int, within: float
    ) -> list[Event]:
        """Wait until ``count`` events match ``predicate``; return them all."""

        def matching() -> list[Event]:
            return [event for event in self.events if predicate(event)]

        try:
            async with asyncio.timeout(within):
                async with self._changed:
                    while len(matching()) < count:
                        if self._reader is None or self._eof:
                            raise PeerError(
                                f"{self.name} exited ({self.returncode}) before the expected "
                                f"event; {self.diagnostics()}"
                            )
                        await self._changed.wait()
        except TimeoutError:
            raise PeerError(
                f"{self.name}: {len(matching())}/{count} expected events after {within} s; "
                f"{self.diagnostics()}"
            ) from None
        return matching()

    async def send(self, command: Mapping[str, Any]) -> None:
        """Write one JSON command line to the peer's stdin."""
        if self._proc is None or self._proc.stdin is None:
            raise PeerError(f"{self.name} not started")
        self._proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self._proc.stdin.drain()

    async def request(self, command: Mapping[str, Any], within: float) -> Event:
        """Send a command with a fresh ``id`` and wait for the reply carrying that id."""
        request_id = next(self._ids)
        await self.send({**command, "id": request_id})
        return await self.wait_event(lambda e: e.get("id") == request_id, within)

    async def stop(self, within: float = 10.0) -> None:
        """Close stdin (the peer's cue to exit), wait up to ``within`` s, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            await self.kill()
        await self._finish()

    async def kill(self) -> None:
        """SIGKILL the peer's whole process group (a crash, not a shutdown)."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10.0)

    def diagnostics(self, limit: int = 3000) -> str:
        """The tail of the peer's stderr, for error messages."""
        self._stderr.seek(0)
        tail = self._stderr.read()[-limit:].decode(errors="replace")
        return f"stderr of {self.name}:\n{tail}" if tail else f"{self.name} wrote no stderr"

    async def __aenter__(self) -> PeerProcess:
        """Start the peer unless already started; either way it is stopped at exit."""
        if self._proc is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            await self.kill()
            self._stderr.close()

    async def _finish(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 5.0)

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while line := await self._proc.stdout.readline():
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "unparsed", "line": line.decode(errors="replace")}
                async with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        finally:
            # Wake waiters so they notice the peer is gone instead of waiting for the timeout.
            async with self._changed:
                self._eof = True
                self._changed.notify_all()
