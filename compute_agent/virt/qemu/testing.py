"""Test kit for the QEMU driver: find the guests' QEMU processes under a state dir, and end them.

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

from compute_agent.virt.qemu import process


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
