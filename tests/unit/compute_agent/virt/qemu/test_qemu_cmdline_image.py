"""The QEMU driver's pure parts: command line, disk names, initramfs, image catalogue, config."""

from __future__ import annotations

import gzip
import json
import re
import stat
from pathlib import Path

import pytest

from compute_agent.virt import create_driver
from compute_agent.virt.qemu import ImageCatalogue, ImageNotFound, QemuDriver, QemuDriverConfig
from compute_agent.virt.qemu import image as image_mod
from compute_agent.virt.qemu.cmdline import Disk, build_command, volume_file_name
from compute_agent.virt.qemu.initramfs import INIT_SCRIPT, VIRTIO_MODULES, build_initramfs
from shared_objects.runtime.config import load_config

UUID = "5b1e0c5e-0000-4000-8000-000000000001"


def command(**overrides: object) -> list[str]:
    args: dict[str, object] = {
        "binary": "qemu-system-x86_64",
        "uuid": UUID,
        "kernel": Path("/img/vmlinuz"),
        "initrd": Path("/img/initrd.gz"),
        "memory_mb": 128,
        "guest_dir": Path("/state/qemu-h/" + UUID),
        "accel": "kvm:tcg",
        "cpu_model": "max",
        "hotplug_slots": 4,
    }
    args.update(overrides)
    return build_command(**args)  # type: ignore[arg-type]


def option_values(cmd: list[str], option: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == option]


def test_command_line_has_no_network_and_keeps_serial_and_qmp_in_the_guest_dir() -> None:
    cmd = command()
    assert option_values(cmd, "-nic") == ["none"]
    assert not any(a.startswith(("-netdev", "-net")) and a != "-nic" for a in cmd)
    assert "-nodefaults" in cmd and "-daemonize" in cmd and "-no-reboot" in cmd
    assert option_values(cmd, "-serial") == [f"file:/state/qemu-h/{UUID}/serial.log"]
    # Bound relative to QEMU's cwd (the guest dir): deep state dirs stay under sun_path's limit.
    assert option_values(cmd, "-qmp") == [
        "unix:qmp.sock,server=on,wait=off",
        "unix:qmp-tools.sock,server=on,wait=off",
    ]
    assert option_values(cmd, "-pidfile") == [f"/state/qemu-h/{UUID}/qemu.pid"]
    assert option_values(cmd, "-name") == [f"fleet-{UUID}"]
    assert option_values(cmd, "-m") == ["128"]


def test_accel_list_and_root_ports() -> None:
    assert option_values(command(), "-accel") == ["kvm", "tcg"]
    assert option_values(command(accel="tcg"), "-accel") == ["tcg"]
    ports = [d for d in option_values(command(), "-device") if d.startswith("pcie-root-port")]
    assert [re.search(r"id=(rp\d+)", p).group(1) for p in ports] == ["rp1", "rp2", "rp3", "rp4"]  # type: ignore[union-attr]
    assert len({re.search(r"chassis=(\d+)", p).group(1) for p in ports}) == 4  # type: ignore[union-attr]


def test_cold_plugged_disks_use_json_options() -> None:
    disk = Disk("vol,with,commas", Path("/v/a,b.img"), 3)
    cmd = command(disks=[disk])
    blockdev = json.loads(option_values(cmd, "-blockdev")[0])
    assert blockdev["file"]["filename"] == "/v/a,b.img"
    device = json.loads(option_values(cmd, "-device")[-1])
    assert device == {
        "driver": "virtio-blk-pci",
        "id": disk.device_id,
        "drive": disk.node_name,
        "bus": "rp3",
    }


def test_disk_names_are_valid_qemu_ids() -> None:
    disk = Disk("0f6a1c2e-9b1d-4d5e-8f00-123456789abc", Path("/v"), 1)
    for name in (disk.node_name, disk.device_id):
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) and len(name) <= 31
    assert disk.node_name != Disk("other", Path("/v"), 1).node_name
    assert volume_file_name("0f6a1c2e-9b1d") == "0f6a1c2e-9b1d.img"
    assert re.fullmatch(r"vol-[0-9a-f]{32}\.img", volume_file_name("../etc/passwd"))


def parse_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc archive."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[body : body + size], (rmaj, rmin))
        pos = body + size + (-size % 4)


def test_initramfs_holds_busybox_init_console_and_modules() -> None:
    modules = {m: f"module {m}".encode() for m in VIRTIO_MODULES}
    archive = parse_cpio(gzip.decompress(build_initramfs(b"\x7fELF busybox", modules)))
    mode, body, _ = archive["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and body == INIT_SCRIPT.encode()
    mode, _, rdev = archive["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert archive["bin/busybox"][1] == b"\x7fELF busybox"
    assert stat.S_ISLNK(archive["bin/sh"][0]) and archive["bin/sh"][1] == b"busybox"
    for m in VIRTIO_MODULES:
        assert archive[f"lib/modules/{m}.ko"][1] == f"module {m}".encode()
    # The init loads the modules in dependency order and prints what the driver waits for.
    assert " ".join(VIRTIO_MODULES) in INIT_SCRIPT
    assert "fleet-guest: heartbeat $n" in INIT_SCRIPT and "fleet-guest: disks [" in INIT_SCRIPT


def make_image(image_dir: Path, name: str, complete: bool = True) -> None:
    path = image_dir / name
    path.mkdir(parents=True)
    (path / "vmlinuz").write_bytes(b"k")
    if complete:
        (path / "initrd.gz").write_bytes(b"i")
    (path / "manifest.json").write_text(json.dumps({"name": name}))


def test_catalogue_finds_complete_images_only(tmp_path: Path) -> None:
    make_image(tmp_path, "fleet-busybox")
    make_image(tmp_path, "broken", complete=False)
    (tmp_path / ".fleet-busybox-tmp").mkdir()  # a build in progress
    catalogue = ImageCatalogue(tmp_path)
    image = catalogue.get("fleet-busybox")
    assert image.kernel == tmp_path / "fleet-busybox" / "vmlinuz"
    with pytest.raises(ImageNotFound, match="make guest-image"):
        catalogue.get("broken")
    with pytest.raises(ImageNotFound):
        catalogue.get("../fleet-busybox")
    with pytest.raises(ImageNotFound, match="known: broken, fleet-busybox"):
        catalogue.get("cirros")


def test_build_image_keeps_a_present_image_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path, "fleet-busybox")

    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not run apt when the image exists")

    monkeypatch.setattr(image_mod, "_run", no_apt)
    assert image_mod.build_image(tmp_path).name == "fleet-busybox"


def test_compute_section_selects_and_configures_the_qemu_driver(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "FLEET_COMPUTE__DRIVER": "qemu",
            "FLEET_STATE_DIR": str(tmp_path),
            "FLEET_COMPUTE__QEMU_ACCEL": "tcg",
            "FLEET_COMPUTE__QEMU_IMAGE_DIR": str(tmp_path / "img"),
        }
    )
    assert load_config({}).compute.driver == "fake"
    driver = create_driver(cfg.compute.driver, cfg.compute.qemu_driver_options())
    assert isinstance(driver, QemuDriver)
    config = driver.config
    assert (config.accel, config.guest_memory_mb, config.state_dir) == ("tcg", 128, tmp_path)
    assert config.image_dir == tmp_path / "img"
    assert config.volumes_path == tmp_path / "volumes"


def test_bad_qemu_options_are_refused() -> None:
    with pytest.raises(ValueError, match="accel"):
        QemuDriverConfig.from_mapping({"accel": "hvf"})
    with pytest.raises(ValueError, match="96"):
        QemuDriverConfig.from_mapping({"guest_memory_mb": 64})
    with pytest.raises(ValueError, match="unknown qemu driver option"):
        QemuDriverConfig.from_mapping({"spawn_delay_s": 1})
