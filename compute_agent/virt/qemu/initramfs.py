"""The guest's initramfs: busybox-static and an /init, packed as a gzip'd cpio (newc) archive.

The archive is written here rather than by the ``cpio`` tool so the build needs no privileges:
the ``/dev/console`` node the kernel opens for init's output is just a header in the archive.
The init prints one line per event on the serial console (``LINE_PREFIX`` + what), which the
driver and the tests read: ``init ready``, ``heartbeat N`` every second, and ``disks [vda vdb]``
whenever the guest's block devices change.
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Sequence
from dataclasses import dataclass

#: Every line the init prints starts with this.
LINE_PREFIX = "fleet-guest:"
#: The line that makes a guest ACTIVE: the first heartbeat proves init runs its loop.
HEARTBEAT = f"{LINE_PREFIX} heartbeat "
#: Modules for a virtio disk, in load order (dependencies first).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)

INIT_SCRIPT = """#!/bin/sh
# Fleet guest init (compute_agent/virt/qemu/initramfs.py): heartbeat and disk list on ttyS0.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in {modules}; do
  insmod /lib/modules/$m.ko || echo "{p} insmod $m failed"
done
echo "{p} init ready kernel=$(uname -r)"
n=0
last=none
while true; do
  disks=$(ls /sys/block | grep -v -e '^loop' -e '^ram' | tr '\\n' ' ')
  disks=${{disks% }}
  if [ "$disks" != "$last" ]; then
    echo "{p} disks [$disks]"
    last=$disks
  fi
  n=$((n + 1))
  echo "{p} heartbeat $n"
  sleep 1
done
""".format(modules=" ".join(VIRTIO_MODULES), p=LINE_PREFIX)


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a file, a symlink or a character device."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(path: str) -> Entry:
    """A directory entry (0755)."""
    return Entry(path, stat.S_IFDIR | 0o755)


def regular(path: str, data: bytes, executable: bool = False) -> Entry:
    """A regular file entry."""
    return Entry(path, stat.S_IFREG | (0o755 if executable else 0o644), data)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link entry."""
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int) -> Entry:
    """A character device node (no mknod needed: the kernel creates it on unpacking)."""
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(entries: Sequence[Entry]) -> bytes:
    """The entries as an uncompressed cpio "newc" archive (owner root, mtime 0)."""
    out = io.BytesIO()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.path.lstrip("/").encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,  # mtime: reproducible archives
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name + _pad4(len(header) + len(name)))
        out.write(entry.data + _pad4(len(entry.data)))
    return out.getvalue()


def build_initramfs(busybox: bytes, modules: dict[str, bytes]) -> bytes:
    """The gzip'd initramfs: busybox, the init script, the given kernel modules."""
    entries = [
        directory("/bin"),
        directory("/dev"),
        directory("/proc"),
        directory("/sys"),
        directory("/lib"),
        directory("/lib/modules"),
        char_device("/dev/console", 5, 1),
        regular("/bin/busybox", busybox, executable=True),
        symlink("/bin/sh", "busybox"),
        regular("/init", INIT_SCRIPT.encode(), executable=True),
    ]
    entries += [regular(f"/lib/modules/{name}.ko", data) for name, data in modules.items()]
    return gzip.compress(cpio_newc(entries), compresslevel=9, mtime=0)
