"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared_objects import sdnotify
from shared_objects.sdnotify import SystemdNotifier


class FakeSystemd:
    """Binds the socket systemd would own and reads what the service sends."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def receive(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify.sock")
    listener = FakeSystemd(path)
    try:
        yield listener, path
    finally:
        listener.sock.close()


def test_ready_stopping_status_arrive_as_datagrams(fake: tuple[FakeSystemd, str]) -> None:
    listener, path = fake
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("consuming") is True
    assert listener.receive() == ["READY=1", "STATUS=consuming"]
    assert notifier.status("draining 3 requests")
    assert listener.receive() == ["STATUS=draining 3 requests"]
    assert notifier.stopping()
    assert listener.receive() == ["STOPPING=1"]


def test_abstract_socket_names_start_with_at() -> None:
    name = f"fleet-test-{uuid.uuid4().hex}"
    listener = FakeSystemd("\0" + name)
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert listener.receive() == ["WATCHDOG=1"]
    finally:
        listener.sock.close()


def test_everything_is_a_noop_without_notify_socket() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval is None


def test_send_to_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False


def test_module_functions_use_the_current_environment(
    fake: tuple[FakeSystemd, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, path = fake
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready()
    assert listener.receive()[0] == "READY=1"
    assert sdnotify.stopping()
    assert listener.receive() == ["STOPPING=1"]


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(env).watchdog_interval == 15.0
    # WATCHDOG_PID naming another process means the watchdog is not ours.
    assert SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "bogus"}).watchdog_interval is None


async def test_watchdog_task_pings_at_half_the_interval(fake: tuple[FakeSystemd, str]) -> None:
    listener, path = fake
    # WatchdogSec=0.2s -> a ping every 0.1 s.
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    task = asyncio.create_task(notifier.watchdog_task())
    await asyncio.sleep(0.55)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = listener.pending()
    assert all(p == ["WATCHDOG=1"] for p in pings)
    # Pings at t=0, 0.1, ..., 0.5: six expected; allow scheduling jitter on a busy machine.
    assert 4 <= len(pings) <= 7


async def test_blocked_event_loop_stops_the_watchdog_pings(fake: tuple[FakeSystemd, str]) -> None:
    listener, path = fake
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.watchdog_task())
    await asyncio.sleep(0.12)
    listener.pending()
    time.sleep(0.4)  # noqa: ASYNC251 - deliberately block the loop, as a hung service would
    during_block = listener.pending()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert during_block == []


async def test_watchdog_task_returns_when_no_watchdog_is_configured(
    fake: tuple[FakeSystemd, str],
) -> None:
    _, path = fake
    await asyncio.wait_for(SystemdNotifier({"NOTIFY_SOCKET": path}).watchdog_task(), 1.0)
    await asyncio.wait_for(SystemdNotifier({}).watchdog_task(), 1.0)
