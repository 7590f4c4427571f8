"""Real QEMU guests (issue 18): opt-in with ``pytest -m qemu tests/integration/virt_qemu``.

Skipped with the reason when qemu-system-x86_64 is missing or the guest image cannot be built.
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which(QEMU) is None:
        skip = pytest.mark.skip(reason=f"{QEMU} not installed (apt-get install qemu-system-x86)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest_image_dir() -> Path:
    """The catalogue holding the default image, built once if missing."""
    if DEFAULT_IMAGE not in ImageCatalogue(IMAGE_DIR).names():
        try:
            build_image(IMAGE_DIR)
        except (RuntimeError, OSError) as exc:
            pytest.skip(f"cannot build the guest image: {exc}")
    return IMAGE_DIR


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
