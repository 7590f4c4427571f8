"""aio-pika's robust connection over several broker URLs: each connection attempt moves on to
the next host (round robin, like oslo's default strategy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.robust_connection import RobustConnection


class FailoverRobustConnection(RobustConnection):
    """A robust connection that tries the next host of a multi-host URL on every attempt."""

    def __init__(self, urls: Sequence[str], **kwargs: Any):
        self._failover_urls = [aio_pika.connection.make_url(u) for u in urls]
        self._attempt = 0
        super().__init__(self._failover_urls[0], **kwargs)

    # aio-pika calls this (name-mangled private) method for every connection attempt.
    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self._failover_urls[self._attempt % len(self._failover_urls)]
        self._attempt += 1
        await RobustConnection._RobustConnection__connect_transport(self)  # type: ignore[attr-defined]
