"""Real QEMU guests (issue 18): in ``make test``; deselected from a bare ``pytest`` (-m qemu).

Skipped with the reason (and a banner under the summary) when qemu-system-x86_64 is missing or
the guest image cannot be built; failed instead when FLEET_QEMU_REQUIRED=1.
Every test reaps the QEMU processes under its state directory, even when it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_agent.virt import GuestRef
from compute_agent.virt.qemu import QemuDriver, QemuDriverConfig
from compute_agent.virt.qemu.image import DEFAULT_IMAGE, ImageCatalogue, build_image
from compute_agent.virt.qemu.testing import cluster_env, reap_guests

QEMU = "qemu-system-x86_64"
#: This machine kind's /dev/kvm cannot run guests (docs/virt.md): TCG unless told otherwise.
ACCEL = os.environ.get("FLEET_TEST_QEMU_ACCEL", "tcg")
IMAGE_DIR = Path(os.environ.get("FLEET_TEST_QEMU_IMAGE_DIR", "~/.cache/fleet/images")).expanduser()


def _unavailable(reason: str) -> None:
    """This machine cannot run guests: skip (loudly, see below), or fail when required."""
    if os.environ.get("FLEET_QEMU_REQUIRED") == "1":
        pytest.fail(f"QEMU tests required (FLEET_QEMU_REQUIRED=1) but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_image_dir() -> Path:
    """The catalogue holding the default image, built once if missing."""
    if shutil.which(QEMU) is None:
        _unavailable(f"{QEMU} not installed (make guest-image installs it as root)")
    if DEFAULT_IMAGE not in ImageCatalogue(IMAGE_DIR).names():
        try:
            build_image(IMAGE_DIR)
        except (RuntimeError, OSError) as exc:
            _unavailable(f"cannot build the guest image: {exc}")
    return IMAGE_DIR


@pytest.fixture(autouse=True)
def _needs_qemu(guest_image_dir: Path) -> None:
    """Every test here needs QEMU and the image, whatever fixtures it asks for."""


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """A skipped real-guest test must not read like a pass: one banner under the summary."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "virt_qemu" in str(r.nodeid)]
    if skipped:
        reason = str(skipped[0].longrepr[-1]) if isinstance(skipped[0].longrepr, tuple) else ""
        terminalreporter.write_sep(
            "!", f"{len(skipped)} QEMU test(s) SKIPPED: {reason}", red=True, bold=True
        )


@pytest.fixture
def qemu_state_dir() -> Iterator[Path]:
    """A short state dir (unix socket paths) whose guests are all killed at the end."""
    path = Path(tempfile.mkdtemp(prefix="fq-", dir="/tmp"))
    try:
        yield path
    finally:
        reaped = reap_guests(path)
        shutil.rmtree(path, ignore_errors=True)
        assert reaped == 0, f"{reaped} QEMU process(es) left behind by the test"


@pytest.fixture
async def qemu_driver(qemu_state_dir: Path, guest_image_dir: Path) -> AsyncIterator[QemuDriver]:
    driver = QemuDriver(
        QemuDriverConfig(
            state_dir=qemu_state_dir, image_dir=guest_image_dir, accel=ACCEL, detach_timeout_s=3
        )
    )
    await driver.init_host("host-a")
    try:
        yield driver
    finally:
        for uuid in await driver.list_instance_uuids():
            await driver.destroy(GuestRef(uuid))
        await driver.cleanup_host()


@pytest.fixture
async def qemu_cluster(
    cluster_factory: Any, guest_image_dir: Path
) -> AsyncIterator[tuple[Any, Path]]:
    """A cluster (conductor + compute-1, compute-2) whose agents run real guests; with the
    agents' state dir (``<state>/qemu-<host>/<uuid>/``). No guest outlives the test."""
    state: Path | None = None
    try:
        async with cluster_factory(common_env=cluster_env(guest_image_dir, ACCEL)) as cluster:
            state = cluster.workdir / "hypervisors"
            yield cluster, state
    finally:
        # Guests outlive their agents by design: whatever happened, none outlives the test.
        if state is not None:
            await asyncio.to_thread(reap_guests, state)
