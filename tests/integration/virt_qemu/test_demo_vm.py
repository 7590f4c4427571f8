"""``make demo-vm`` runs to its end with real guests and says what it showed (issue 18, 3)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compute_agent.virt.qemu.testing import guest_processes

pytestmark = [pytest.mark.qemu, pytest.mark.integration]


async def test_demo_vm_boots_hotplugs_and_migrates_a_running_guest(
    tmp_path: Path, guest_image_dir: Path
) -> None:
    workdir = tmp_path / "demo-vm"
    env = {**os.environ, "FLEET_COMPUTE__QEMU_IMAGE_DIR": str(guest_image_dir)}
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "conductor.tools.demo_vm", "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    # The guest's own console lines, quoted by the demo: the disk appears, then goes.
    assert "| fleet-guest: disks [vda]" in text
    assert "| fleet-guest: disks []" in text
    assert "the same guest kept running across the move" in text
    assert "%" in text  # the progress bar was drawn
    assert guest_processes(workdir / "hypervisors") == {}
