"""What a handler can ask about the request it serves: the version the caller asked for, and its
handler slot (released early by a handler that only waits, so it stops counting against the
server's concurrency).
"""

from __future__ import annotations

import asyncio
import contextvars

_REQUEST_VERSION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fleet_rpc_request_version", default=None
)


class _Slot:
    """One handler's place among the server's ``max_concurrency``; given back exactly once."""

    __slots__ = ("_semaphore", "held")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "fleet_rpc_handler_slot", default=None
)


def release_handler_slot() -> None:
    """Give the running handler's concurrency slot back before it waits for work that another
    task does and that holds no per-request resource (no database connection of its own).

    ``max_concurrency`` exists to bound what handlers hold while they run (database
    connections above all). A handler that only waits for a shared batch (``report_alive``
    waits up to half a second for the batched UPDATE another task runs) would otherwise keep
    a slot the whole time: at 1,000 hosts such beats held most of a conductor's slots and every
    other request queued behind them. After this call the handler still runs to the end and
    replies; it just no longer counts. No-op outside a handler.
    """
    slot = _SLOT.get()
    if slot is not None:
        slot.release()


def request_version() -> str | None:
    """The API version the caller asked for, while its handler runs and its result is
    serialised (None outside a handler): lets a reply speak the caller's release."""
    return _REQUEST_VERSION.get()
