"""The guest image catalogue of the QEMU driver, and the builder that fills it.

An image is a directory ``<image_dir>/<name>/`` holding ``vmlinuz``, ``initrd.gz`` and
``manifest.json``; ``image_ref`` names one. The builder uses Debian's packages only: the kernel
and its virtio modules come from ``linux-image-<version>-amd64`` (``apt-get download`` +
``dpkg-deb -x``), the userland from ``busybox-static``; the initramfs is ``initramfs.py``'s.
It builds in a temporary directory beside the image and renames it into place, so a reader
never sees half an image.

    python -m compute_agent.virt.qemu build [--dir DIR] [--force]   # make guest-image
    python -m compute_agent.virt.qemu list [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compute_agent.virt.qemu.errors import ImageNotFound
from compute_agent.virt.qemu.initramfs import VIRTIO_MODULES, build_initramfs

#: The image the builder makes by default (and the one tests and demos boot).
DEFAULT_IMAGE = "fleet-busybox"
#: Where images live unless configured otherwise (outside any checkout: they are 10 MB).
DEFAULT_IMAGE_DIR = Path("~/.cache/fleet/images")
BUSYBOX = Path("/bin/busybox")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class GuestImage:
    """One bootable image of the catalogue."""

    name: str
    kernel: Path
    initrd: Path
    manifest: dict[str, Any]


class ImageCatalogue:
    """The images under one directory, looked up by ``image_ref``."""

    def __init__(self, image_dir: Path | str | None = None) -> None:
        self.image_dir = Path(image_dir or DEFAULT_IMAGE_DIR).expanduser()

    def names(self) -> list[str]:
        """Names of the complete images present (sorted)."""
        if not self.image_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.image_dir.iterdir()
            if _NAME.match(p.name) and (p / "manifest.json").is_file()
        )

    def get(self, image_ref: str) -> GuestImage:
        """The image ``image_ref``; ImageNotFound if it is not (completely) built."""
        if not _NAME.match(image_ref or ""):
            raise self._not_found(image_ref)
        path = self.image_dir / image_ref
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self._not_found(image_ref) from exc
        image = GuestImage(image_ref, path / "vmlinuz", path / "initrd.gz", manifest)
        if not (image.kernel.is_file() and image.initrd.is_file()):
            raise self._not_found(image_ref)
        return image

    def _not_found(self, image_ref: str) -> ImageNotFound:
        return ImageNotFound(
            image_ref=image_ref,
            image_dir=str(self.image_dir),
            known=", ".join(self.names()) or "none",
        )


def default_kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` currently points at."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    match = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if match is None:
        raise RuntimeError(f"cannot find the kernel package behind linux-image-amd64:\n{out}")
    return match.group(1)


def build_image(
    image_dir: Path | str | None = None,
    name: str = DEFAULT_IMAGE,
    kernel_package: str | None = None,
    force: bool = False,
) -> GuestImage:
    """Build image ``name`` (blocking: run it in a thread from async code). Kept if present."""
    catalogue = ImageCatalogue(image_dir)
    if not _NAME.match(name):
        raise ValueError(f"bad image name {name!r}")
    if not force and name in catalogue.names():
        return catalogue.get(name)
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} missing: apt-get install busybox-static")
    package = kernel_package or default_kernel_package()
    catalogue.image_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=catalogue.image_dir) as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        (deb,) = work.glob("*.deb")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        (kernel,) = (root / "boot").glob("vmlinuz-*")
        version = kernel.name.removeprefix("vmlinuz-")
        modules = {m: _find_module(root / "lib/modules" / version, m) for m in VIRTIO_MODULES}
        image = work / "image"
        image.mkdir()
        shutil.copyfile(kernel, image / "vmlinuz")
        initrd = build_initramfs(BUSYBOX.read_bytes(), modules)
        (image / "initrd.gz").write_bytes(initrd)
        manifest = {
            "name": name,
            "kernel_package": package,
            "kernel_version": version,
            "modules": list(VIRTIO_MODULES),
            "busybox": _busybox_version(),
            "initrd_bytes": len(initrd),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (image / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        target = catalogue.image_dir / name
        old = work / "old"
        if target.exists():
            os.replace(target, old)
        os.replace(image, target)
    return catalogue.get(name)


def _find_module(modules_dir: Path, name: str) -> bytes:
    found = sorted(modules_dir.rglob(f"{name}.ko"))
    if not found:
        raise RuntimeError(f"module {name}.ko not in {modules_dir} (compressed modules?)")
    return found[0].read_bytes()


def _busybox_version() -> str:
    first = _run([str(BUSYBOX)], check=False).stdout.splitlines()[:1]
    return first[0].strip() if first else "unknown"


def _run(
    cmd: list[str], cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: ``build`` or ``list``."""
    parser = argparse.ArgumentParser(prog="python -m compute_agent.virt.qemu")
    parser.add_argument("action", choices=("build", "list"))
    parser.add_argument("--dir", default=os.environ.get("FLEET_COMPUTE__QEMU_IMAGE_DIR"))
    parser.add_argument("--name", default=DEFAULT_IMAGE)
    parser.add_argument("--kernel-package", default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    catalogue = ImageCatalogue(args.dir)
    if args.action == "list":
        for name in catalogue.names():
            manifest = catalogue.get(name).manifest
            print(f"{name}\t{manifest.get('kernel_version')}\t{manifest.get('built_at')}")
        return 0
    started = time.monotonic()
    image = build_image(args.dir, args.name, args.kernel_package, force=args.force)
    print(
        f"{image.name}: {image.kernel.parent} (kernel {image.manifest['kernel_version']}, "
        f"initrd {image.manifest['initrd_bytes']} bytes, {time.monotonic() - started:.1f} s)"
    )
    return 0
