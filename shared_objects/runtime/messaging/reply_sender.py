"""Sends a server's replies, retrying briefly when the caller's reply queue is missing.

After a broker restart or failover the caller re-declares its reply queue a moment after the
server is back, so a reply can bounce (``NO_ROUTE``). Like oslo (which retries for 60 s), the
reply is retried for a short window; unlike oslo, the retry runs in the background, so it never
holds a handler slot, and the number of replies retrying at once is capped, so messages naming
bogus reply queues cannot pile up work. A queue that stayed missing for the whole window is
remembered for a while and further replies to it are dropped at once.

Replies to Fleet reply queues (``reply_<login>_<hex>``) go through the reply exchange, those to
oslo.messaging peers (``reply_<hex>``) through the default exchange; a ``_reply_q`` naming any
other queue gets no reply at all (``topology.reply_route``).
"""

from __future__ import annotations

import asyncio
import collections
import time

import structlog

from shared_objects.runtime.messaging.driver import Driver
from shared_objects.runtime.messaging.exceptions import MessageDeliveryFailure, MessageUndeliverable
from shared_objects.runtime.messaging.stats import RPCStats
from shared_objects.runtime.messaging.topology import reply_route

log = structlog.get_logger(__name__)

_RETRY_INTERVAL = 0.25
_OBSOLETE_TTL = 60.0
_OBSOLETE_SIZE = 200


class ReplySender:
    """Publishes replies to ``_reply_q`` (``reply_route``), mandatory, with retry."""

    def __init__(
        self,
        driver: Driver,
        stats: RPCStats,
        *,
        publish_timeout: float,
        retry_window: float = 5.0,
        max_retrying: int = 256,
    ):
        self._driver = driver
        self._stats = stats
        self._publish_timeout = publish_timeout
        self.retry_window = retry_window
        self.max_retrying = max_retrying
        self._retrying: set[asyncio.Task[None]] = set()
        # reply queue -> monotonic time until which replies to it are dropped at once
        self._obsolete: collections.OrderedDict[str, float] = collections.OrderedDict()

    @property
    def retrying(self) -> int:
        return len(self._retrying)

    async def send(self, queue: str, msg_id: str, body: bytes) -> None:
        """Publish one reply; a bounce schedules background retries instead of failing."""
        if self._is_obsolete(queue):
            self._give_up(queue, msg_id, "reply queue known to be gone")
            return
        if reply_route(queue) is None:
            self._give_up(queue, msg_id, "not a reply queue name")
            return
        try:
            await self._publish(queue, body)
        except MessageUndeliverable:
            if self.retry_window <= 0:
                self._give_up(queue, msg_id, "no such reply queue")
            elif len(self._retrying) >= self.max_retrying:
                self._give_up(queue, msg_id, "too many replies already waiting for their queue")
            else:
                task = asyncio.create_task(self._retry(queue, msg_id, body))
                self._retrying.add(task)
                task.add_done_callback(self._retrying.discard)
        except MessageDeliveryFailure as exc:
            self._give_up(queue, msg_id, str(exc))

    async def _publish(self, queue: str, body: bytes) -> None:
        route = reply_route(queue)
        assert route is not None  # checked by send()
        exchange, routing_key = route
        await self._driver.publish(
            exchange, routing_key, body, mandatory=True, retry_for=self._publish_timeout
        )

    async def _retry(self, queue: str, msg_id: str, body: bytes) -> None:
        deadline = time.monotonic() + self.retry_window
        while time.monotonic() < deadline:
            await asyncio.sleep(_RETRY_INTERVAL)
            if self._is_obsolete(queue):
                break
            try:
                await self._publish(queue, body)
            except MessageUndeliverable:
                continue
            except MessageDeliveryFailure as exc:
                self._give_up(queue, msg_id, str(exc))
                return
            log.info("reply_delivered_after_retry", reply_q=queue, msg_id=msg_id)
            return
        self._mark_obsolete(queue)
        self._give_up(queue, msg_id, f"no such reply queue for {self.retry_window}s")

    def _is_obsolete(self, queue: str) -> bool:
        until = self._obsolete.get(queue)
        if until is None:
            return False
        if until < time.monotonic():
            del self._obsolete[queue]
            return False
        return True

    def _mark_obsolete(self, queue: str) -> None:
        self._obsolete[queue] = time.monotonic() + _OBSOLETE_TTL
        self._obsolete.move_to_end(queue)
        while len(self._obsolete) > _OBSOLETE_SIZE:
            self._obsolete.popitem(last=False)

    def _give_up(self, queue: str, msg_id: str, reason: str) -> None:
        self._stats.dropped["reply_undeliverable"] += 1
        log.warning("reply_undeliverable", reply_q=queue, msg_id=msg_id, reason=reason)

    async def close(self) -> None:
        """Stop retrying (replies still waiting are dropped)."""
        tasks = list(self._retrying)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
