"""systemd's sd_notify protocol: tell the supervisor we are ready, alive, or stopping.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (an abstract socket when the name starts with ``@``). Outside systemd the
variable is unset and every call here is a no-op, so services can call them unconditionally:

    notifier = SystemdNotifier()          # reads NOTIFY_SOCKET / WATCHDOG_USEC once
    watchdog = asyncio.create_task(notifier.watchdog_task())   # from the start: slow start-up
    try:                                                        # is covered by TimeoutStartSec
        async with transport:
            server = RPCServer(...)
            await server.start()
            notifier.ready("consuming on conductor")   # READY=1 once consumers are up
            await stop_requested.wait()                 # set by the SIGTERM handler
            notifier.stopping()                         # STOPPING=1, then drain
            await server.stop(grace=cfg.service.graceful_shutdown_timeout)
    finally:
        watchdog.cancel()

The watchdog pings come from a task on the event loop, never from a thread: if the loop is
blocked, the pings stop and systemd (``WatchdogSec=``) kills and restarts the service.

``NotifyListener`` is the test double for systemd's side: it binds a socket in a temporary
directory, gives the environment to start a service with, and waits for its messages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from shared_objects.runtime.log import get_logger

__all__ = ["NotifyListener", "SystemdNotifier", "ready", "status", "stopping", "watchdog"]

log = get_logger(__name__)


class SystemdNotifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is not set."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace, written with a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = self._read_watchdog(env)

    @staticmethod
    def _read_watchdog(env: Mapping[str, str]) -> int | None:
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        # WATCHDOG_PID, when set, names the process the watchdog is meant for (not a child).
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        return usec if usec > 0 else None

    @property
    def enabled(self) -> bool:
        """True when running under a supervisor that listens (``NOTIFY_SOCKET`` is set)."""
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half of ``WatchdogSec``), or None if off."""
        if not self._address or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when disabled or the send failed."""
        if not self._address:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A datagram to a local socket either goes at once or fails: never waits.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            # The supervisor may be gone (or this is a stale variable); the service keeps going.
            log.warning("sd_notify failed", error=str(exc), message=assignments[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is complete (consumers are up); systemd finishes ``start``."""
        extra = [f"STATUS={status}"] if status else []
        return self.notify("READY=1", *extra)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (send on SIGTERM, before draining)."""
        extra = [f"STATUS={status}"] if status else []
        return self.notify("STOPPING=1", *extra)

    def reloading(self) -> bool:
        """RELOADING=1: configuration reload in progress (send READY=1 when done)."""
        return self.notify("RELOADING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1: one keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=...: one line shown by ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    async def watchdog_task(self, interval: float | None = None) -> None:
        """Ping WATCHDOG=1 every ``interval`` (default WATCHDOG_USEC/2) until cancelled.

        Returns at once when no watchdog is configured, so it can always be started.
        """
        every = self.watchdog_interval if interval is None else interval
        if every is None or not self._address:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(every)


class NotifyListener:
    """Plays systemd's part in tests: receives what a service sends to ``$NOTIFY_SOCKET``.

        with NotifyListener() as listener:
            proc = await asyncio.create_subprocess_exec(
                "compute-agent", env={**os.environ, **listener.environ(watchdog_usec=2_000_000)})
            await listener.wait_for("READY")
            proc.terminate()
            await listener.wait_for("STOPPING")

    Every datagram is kept in ``messages`` as a dict (``{"READY": "1", "STATUS": "..."}``).
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fleet-notify-")
        self.path = os.path.join(self._dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        self._sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def environ(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """Variables to start the service under test with."""
        env = {"NOTIFY_SOCKET": self.path}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _record(self, data: bytes) -> dict[str, str]:
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        self.messages.append(fields)
        return fields

    def drain(self) -> list[dict[str, str]]:
        """Read every datagram already queued (without waiting); returns the new ones."""
        new: list[dict[str, str]] = []
        while True:
            try:
                new.append(self._record(self._sock.recv(65536)))
            except BlockingIOError:
                return new

    def count(self, key: str) -> int:
        """How many received messages set ``key`` (e.g. ``"WATCHDOG"``), after a drain."""
        self.drain()
        return sum(1 for m in self.messages if key in m)

    async def wait_for(
        self, key: str, value: str | None = None, *, within: float = 10.0
    ) -> dict[str, str]:
        """The first message (already received or arriving) that sets ``key`` (to ``value``).

        Raises ``TimeoutError`` listing what did arrive when none does ``within`` seconds.
        """

        def match(message: dict[str, str]) -> bool:
            return key in message and (value is None or message[key] == value)

        self.drain()
        for message in self.messages:
            if match(message):
                return message
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                while True:
                    message = self._record(await loop.sock_recv(self._sock, 65536))
                    if match(message):
                        return message
        except TimeoutError:
            raise TimeoutError(
                f"no {key}= message within {within} s; received {self.messages}"
            ) from None

    def close(self) -> None:
        """Close the socket and remove its directory."""
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _default() -> SystemdNotifier:
    return SystemdNotifier()


def ready(status: str | None = None) -> bool:
    """READY=1 to ``$NOTIFY_SOCKET`` as currently set (no-op outside systemd)."""
    return _default().ready(status)


def stopping(status: str | None = None) -> bool:
    """STOPPING=1 to ``$NOTIFY_SOCKET`` as currently set (no-op outside systemd)."""
    return _default().stopping(status)


def watchdog() -> bool:
    """WATCHDOG=1 to ``$NOTIFY_SOCKET`` as currently set (no-op outside systemd)."""
    return _default().watchdog()


def status(text: str) -> bool:
    """STATUS=text to ``$NOTIFY_SOCKET`` as currently set (no-op outside systemd)."""
    return _default().status(text)


async def watchdog_task() -> None:
    """Ping the watchdog from the event loop every WATCHDOG_USEC/2 until cancelled."""
    await _default().watchdog_task()
