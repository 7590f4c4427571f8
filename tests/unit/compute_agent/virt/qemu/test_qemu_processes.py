"""Finding and ending guest processes by pid file, no QEMU: a stand-in process named like one."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from compute_agent.virt.qemu import process
from compute_agent.virt.qemu.testing import guest_processes, reap_guests

UUID = "3c9a0000-0000-4000-8000-000000000001"


def stand_in(state: Path, host: str, uuid: str) -> subprocess.Popen[bytes]:
    """A `sleep` whose argv says ``fleet-<uuid>`` (as QEMU's ``-name`` does), with a pid file."""
    guest_dir = state / f"qemu-{host}" / uuid
    guest_dir.mkdir(parents=True)
    proc = subprocess.Popen(["bash", "-c", f"exec -a fleet-{uuid} sleep 60"])
    (guest_dir / "qemu.pid").write_text(f"{proc.pid}\n")
    return proc


async def test_pid_files_are_trusted_only_for_the_named_guest(tmp_path: Path) -> None:
    proc = stand_in(tmp_path, "host-a", UUID)
    try:
        for _ in range(100):  # until bash has exec'd
            if process.is_guest_process(proc.pid, UUID):
                break
            await asyncio.sleep(0.01)
        guest_dir = tmp_path / "qemu-host-a" / UUID
        assert process.guest_pid(guest_dir, UUID) == proc.pid
        assert process.guest_pid(guest_dir, "another-uuid") is None  # a reused pid
        assert guest_processes(tmp_path) == {"host-a": {UUID: proc.pid}}
        assert reap_guests(tmp_path) == 1
        proc.wait(5)
        assert guest_processes(tmp_path) == {}
        assert process.guest_pid(guest_dir, UUID) is None
    finally:
        proc.kill()
        proc.wait()
