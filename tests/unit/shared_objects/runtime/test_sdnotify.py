"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from shared_objects.runtime import sdnotify
from shared_objects.runtime.sdnotify import NotifyListener, SystemdNotifier


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    with NotifyListener() as fake_systemd:
        yield fake_systemd


async def test_ready_stopping_status_arrive_as_datagrams(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(listener.environ())
    assert notifier.enabled
    assert notifier.ready("consuming") is True
    assert await listener.wait_for("READY") == {"READY": "1", "STATUS": "consuming"}
    assert notifier.status("draining 3 requests")
    assert await listener.wait_for("STATUS", "draining 3 requests") == {
        "STATUS": "draining 3 requests"
    }
    assert notifier.stopping()
    assert await listener.wait_for("STOPPING") == {"STOPPING": "1"}


def test_abstract_socket_names_start_with_at() -> None:
    name = f"fleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"


def test_everything_is_a_noop_without_notify_socket() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval is None


def test_send_to_a_vanished_socket_is_reported_not_raised(listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.path + ".gone"})
    assert notifier.ready() is False


async def test_module_functions_use_the_current_environment(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    assert sdnotify.ready()
    assert sdnotify.watchdog()
    assert sdnotify.status("x")
    assert sdnotify.stopping()
    await listener.wait_for("STOPPING")
    assert [next(iter(m)) for m in listener.messages] == ["READY", "WATCHDOG", "STATUS", "STOPPING"]


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(env).watchdog_interval == 15.0
    # WATCHDOG_PID naming another process means the watchdog is not ours.
    assert SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "bogus"}).watchdog_interval is None


async def test_watchdog_task_pings_at_half_the_interval(listener: NotifyListener) -> None:
    # WatchdogSec=0.2s -> a ping every 0.1 s.
    notifier = SystemdNotifier(listener.environ(watchdog_usec=200_000))
    task = asyncio.create_task(notifier.watchdog_task())
    await asyncio.sleep(0.55)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    listener.drain()
    assert all(m == {"WATCHDOG": "1"} for m in listener.messages)
    # Pings at t=0, 0.1, ..., 0.5: six expected; allow scheduling jitter on a busy machine.
    assert 4 <= len(listener.messages) <= 7


async def test_blocked_event_loop_stops_the_watchdog_pings(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(listener.environ(watchdog_usec=100_000))
    task = asyncio.create_task(notifier.watchdog_task())
    await asyncio.sleep(0.12)
    listener.drain()
    time.sleep(0.4)  # noqa: ASYNC251 - deliberately block the loop, as a hung service would
    during_block = listener.drain()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert during_block == []


async def test_watchdog_task_returns_when_no_watchdog_is_configured(
    listener: NotifyListener,
) -> None:
    await asyncio.wait_for(SystemdNotifier(listener.environ()).watchdog_task(), 1.0)
    await asyncio.wait_for(SystemdNotifier({}).watchdog_task(), 1.0)


async def test_listener_wait_for_times_out_with_what_it_received(listener: NotifyListener) -> None:
    SystemdNotifier(listener.environ()).status("starting")
    with pytest.raises(TimeoutError, match="STATUS"):
        await listener.wait_for("READY", within=0.2)


# The pattern a service follows, run as a real separate process under the fake systemd.
SERVICE = """
import asyncio, signal
from shared_objects.runtime.sdnotify import SystemdNotifier

async def main():
    notifier = SystemdNotifier()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    watchdog = asyncio.create_task(notifier.watchdog_task())
    notifier.ready("serving")
    await stop.wait()
    notifier.stopping()
    watchdog.cancel()

asyncio.run(main())
"""


async def test_service_process_reports_ready_watchdog_and_stopping_on_sigterm(
    listener: NotifyListener,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVICE,
        env={**os.environ, **listener.environ(watchdog_usec=100_000)},
    )
    try:
        assert (await listener.wait_for("READY", within=20))["STATUS"] == "serving"
        await listener.wait_for("WATCHDOG")
        proc.send_signal(signal.SIGTERM)
        await listener.wait_for("STOPPING")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
