"""Persistence of one fake hypervisor's state in a small JSON file, written atomically.

Every write goes to a fresh temporary file in the same directory and is renamed over the target
(``os.replace``), so a reader — or the agent restarted after a SIGKILL — sees either the old or the
new state, never a torn one. File I/O runs in a worker thread so the event loop never blocks.
Writes are coalesced: callers that change state while a write is running are all covered by the
next single write, and at most one write is in flight at a time (so an older snapshot can never
land after a newer one).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from compute_agent.virt.exceptions import StateFileError

LOG = structlog.get_logger(__name__)

FORMAT_VERSION = 1


def _write_atomic(path: Path, text: str, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}.{uuidlib.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        # Make the rename itself durable (power loss); a SIGKILL alone never needs this.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _remove_stale_tmp(path: Path) -> None:
    # Leftovers of a write interrupted by a crash; the target file itself is intact.
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


class StateStore:
    """Loads and saves the JSON state document of one host."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]], fsync: bool = False):
        self.path = path
        self._snapshot = snapshot
        self._fsync = fsync
        self._generation = 0  # bumped on every state change
        self._written = 0  # generation known to be on disk
        self._writer: asyncio.Task[None] | None = None
        self.writes = 0  # number of file writes done (for tests and diagnostics)

    async def load(self) -> dict[str, Any] | None:
        """Read the state document, or None if the host has none yet."""

        def _load() -> str | None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(self.path)
            return _read(self.path)

        text = await asyncio.to_thread(_load)
        if text is None:
            return None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateFileError(path=str(self.path), reason=str(exc)) from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
            raise StateFileError(path=str(self.path), reason="unknown format")
        return document

    def mark_dirty(self) -> None:
        """Record that the in-memory state changed and must be written."""
        self._generation += 1

    async def flush(self) -> None:
        """Return once every change marked so far is on disk."""
        target = self._generation
        while self._written < target:
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write_latest())
                self._writer.add_done_callback(_log_write_failure)
            # Shielded: a cancelled caller must not leave a half-done write racing a new one.
            await asyncio.shield(self._writer)

    async def _write_latest(self) -> None:
        generation = self._generation
        document = self._snapshot()
        document["format"] = FORMAT_VERSION
        # Serialised in the loop (the C encoder holds the GIL anyway): compact JSON of 500 guests
        # takes about 1 ms; indenting would make it about 5x slower.
        text = json.dumps(document, separators=(",", ":"))
        await asyncio.to_thread(_write_atomic, self.path, text, self._fsync)
        self.writes += 1
        self._written = max(self._written, generation)


def _log_write_failure(task: asyncio.Task[None]) -> None:
    # Retrieve the exception so a writer whose waiters were all cancelled is still reported.
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        LOG.error("virt_state_write_failed", error=repr(exc))
