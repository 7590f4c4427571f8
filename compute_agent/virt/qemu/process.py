"""The QEMU processes of guests: finding them by pid file, and ending them.

QEMU daemonizes, so its processes are not the agent's children: they outlive an agent restart,
and the agent finds them again through ``qemu.pid``. A pid is trusted only if that process's
command line names the guest (pids are reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from compute_agent.virt.qemu.cmdline import PID_FILE


def guest_pid(guest_dir: Path, uuid: str) -> int | None:
    """The pid of the guest's live QEMU process, or None (blocking but tiny: /proc reads)."""
    try:
        pid = int((guest_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_guest_process(pid, uuid) else None


def is_guest_process(pid: int, uuid: str) -> bool:
    """True if ``pid`` is alive and is the QEMU of ``uuid`` (not a zombie, not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and f"fleet-{uuid}".encode() in cmdline.split(b"\0")


async def wait_gone(pid: int, uuid: str, timeout: float) -> bool:
    """Wait until the process is gone; True if it went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while is_guest_process(pid, uuid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def kill(pid: int, uuid: str, timeout: float = 5.0) -> None:
    """SIGKILL the guest's process and wait until it is gone."""
    if is_guest_process(pid, uuid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await wait_gone(pid, uuid, timeout)
