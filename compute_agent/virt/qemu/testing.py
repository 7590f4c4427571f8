"""Test kit for the QEMU driver: find the guests' QEMU processes under a state dir, end them,
read their serial logs, follow migrations of a cluster with real guests.

Guests outlive agents by design, so a test that stops its agents must still reap its guests,
even when it fails: ``reap_guests(state_dir)`` in a ``finally`` does it. Also what an
integration test compares the database with ("the QEMU processes agree").
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from compute_agent.virt.qemu import process
from compute_agent.virt.qemu.cmdline import SERIAL_LOG


def guest_processes(state_dir: Path) -> dict[str, dict[str, int]]:
    """``{host: {uuid: pid}}`` of the live guest processes under ``state_dir``."""
    found: dict[str, dict[str, int]] = {}
    for host_dir in sorted(state_dir.glob("qemu-*")):
        for guest_dir in sorted(p for p in host_dir.iterdir() if p.is_dir()):
            pid = process.guest_pid(guest_dir, guest_dir.name)
            if pid is not None:
                found.setdefault(host_dir.name.removeprefix("qemu-"), {})[guest_dir.name] = pid
    return found


def reap_guests(state_dir: Path, timeout: float = 5.0) -> int:
    """SIGKILL every guest process under ``state_dir``; how many there were (blocking)."""
    victims = [
        (uuid, pid)
        for guests in guest_processes(state_dir).values()
        for uuid, pid in guests.items()
    ]
    for _, pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(process.is_guest_process(pid, uuid) for uuid, pid in victims):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return len(victims)


async def wait_serial(path: Path, needle: str, timeout: float, start: int = 0) -> float:
    """Wait until ``needle`` appears in the serial log after byte ``start``; seconds waited."""
    began = time.monotonic()
    while True:
        text = await asyncio.to_thread(_read, path)
        if needle in text[start:]:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{needle!r} not in {path} within {timeout} s: {text[-400:]!r}")
        await asyncio.sleep(0.05)


def last_disks_line(path: Path) -> str | None:
    """The guest's latest ``disks [...]`` report, e.g. ``"disks [vda]"``."""
    lines = [line for line in _read(path).splitlines() if "fleet-guest: disks [" in line]
    return lines[-1].split("fleet-guest: ", 1)[1].strip() if lines else None


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def cluster_env(image_dir: Path, accel: str = "tcg") -> dict[str, str]:
    """The agents' environment of a cluster with real guests (tests, ``bench/``, the demo).

    TCG by default: this machine kind's /dev/kvm cannot run guests (docs/virt.md).
    """
    return {
        "FLEET_COMPUTE__DRIVER": "qemu",
        "FLEET_COMPUTE__QEMU_ACCEL": accel,
        "FLEET_COMPUTE__QEMU_IMAGE_DIR": str(image_dir),
        "FLEET_COMPUTE__QEMU_DETACH_TIMEOUT": "3",
        "FLEET_COMPUTE__QEMU_BOOT_TIMEOUT": "120",
    }


def serial_path(state_dir: Path, host: str, uuid: str) -> Path:
    """The serial log of guest ``uuid`` on ``host`` under an agents' state dir."""
    return state_dir / f"qemu-{host}" / uuid / SERIAL_LOG


def last_heartbeat(path: Path) -> int | None:
    """The guest's latest heartbeat counter in its serial log (None before the first)."""
    text = _read(path)
    if "heartbeat " not in text:
        return None
    return int(text.rsplit("heartbeat ", 1)[1].split()[0])


def first_heartbeat(path: Path) -> int | None:
    """The first heartbeat counter in the serial log (after a migration: where it went on)."""
    text = _read(path)
    if "heartbeat " not in text:
        return None
    return int(text.split("heartbeat ", 1)[1].split()[0])


#: Migration statuses after which nothing changes any more.
MIGRATION_DONE = frozenset({"completed", "failed", "error", "cancelled"})


async def wait_migration(
    tasks: Any, ctxt: Any, migration: str, within: float = 120
) -> dict[str, Any]:
    """Poll the compute-task API until the Migration ended; its final row."""
    deadline = time.monotonic() + within
    while True:
        got = dict(await tasks.get_migration(ctxt, migration_uuid=migration))
        if got["status"] in MIGRATION_DONE:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration {migration} not done within {within} s: {got}")
        await asyncio.sleep(0.1)


async def wait_copying(tasks: Any, ctxt: Any, migration: str, within: float = 60) -> None:
    """Wait until QEMU reported copied bytes for the Migration (the copy is under way)."""
    deadline = time.monotonic() + within
    while True:
        got = await tasks.get_migration(ctxt, migration_uuid=migration)
        if got["memory_processed"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no copy progress within {within} s: {dict(got)}")
        await asyncio.sleep(0.1)


async def wait_new_heartbeat(path: Path, timeout: float = 10) -> int:
    """Wait for a heartbeat printed after now; its counter (the guest runs)."""
    start = len(_read(path))
    await wait_serial(path, "heartbeat ", timeout, start=start)
    counter = last_heartbeat(path)
    if counter is None:  # the log was truncated under us (the guest booted again)
        raise TimeoutError(f"no heartbeat counter in {path}")
    return counter


async def wait_disks(path: Path, expected: str, timeout: float = 15) -> None:
    """Wait until the guest's latest disk report (serial log ``path``) is ``expected``."""
    deadline = time.monotonic() + timeout
    while last_disks_line(path) != expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest says {last_disks_line(path)}, not {expected}")
        await asyncio.sleep(0.05)
