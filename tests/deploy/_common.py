"""What both halves of ``make test-deploy`` share (issue 17): output, timings, the skip
convention, the cache directory, the Debian mirror and the debootstrapped Debian root.

The drivers run as scripts (``python tests/deploy/<driver>.py``), so this module is imported as
a sibling (``import _common``), never as part of a package.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FLEET_DEPLOY_CACHE", "/var/tmp/fleet-deploy-cache"))
SUITE = "bookworm"
# The root both halves start from: the systemd half boots it, the compose half imports it as the
# base image of its local images (python3 and python3-venv are what the Fleet image needs).
ROOT_PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv"
EXIT_SKIPPED = 77

timings: dict[str, float] = {}


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the run through SystemExit, so every cleanup (finally) runs."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


class Skip(Exception):
    """This machine cannot run the test (printed loudly, exit 77)."""


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.monotonic() - started


def run(*argv: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=True, text=True, **kwargs)


def apt_install(*packages: str) -> None:
    """Install Debian packages (root); Skip if that is impossible here."""
    if shutil.which("apt-get") is None:
        raise Skip(f"{', '.join(packages)} missing and no apt-get to install them")
    say(f"installing {', '.join(packages)} from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt run on the machine holds the lock for a while at most: wait for it.
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    try:
        run("apt-get", *lock, "update", "-qq", env=env)
        run(
            "apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *packages,
            env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise Skip(f"cannot install {', '.join(packages)}: {exc}") from exc


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (debootstrap needs one)."""
    if mirror := os.environ.get("FLEET_DEPLOY_MIRROR"):
        return mirror
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            # deb822: a stanza with URIs: .../debian and Suites: bookworm ...
            for stanza in text.split("\n\n"):
                uri = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", stanza, re.M)
                if uri and re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.M):
                    return uri.group(1)
            one_line = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+{SUITE}\s", text, re.M)
            if one_line:
                return one_line.group(1)
    return "http://deb.debian.org/debian"


def rootfs_stamp() -> Path:
    """Written (with ROOT_PACKAGES) once the cached root is complete."""
    return CACHE / f"rootfs-{SUITE}.done"


def ensure_rootfs() -> Path:
    """The cached Debian root with systemd and Python (made once, ~1 min)."""
    root = CACHE / f"rootfs-{SUITE}"
    stamp = rootfs_stamp()
    if stamp.exists() and stamp.read_text() == ROOT_PACKAGES:
        return root
    partial = CACHE / f"rootfs-{SUITE}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    say(f"debootstrap {SUITE} from {mirror} into {root} (once; cached)")
    with timed("debootstrap"):
        run(
            "debootstrap", "--variant=minbase", f"--include={ROOT_PACKAGES}", SUITE, partial,
            mirror, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    # No network management in the container: it shares the host's network (and must never
    # touch it), so networkd and resolved stay off whatever the packages' presets say.
    for unit in ("systemd-networkd.service", "systemd-resolved.service"):
        (partial / "etc/systemd/system" / unit).unlink(missing_ok=True)
        (partial / "etc/systemd/system" / unit).symlink_to("/dev/null")
    partial.rename(root)
    stamp.write_text(ROOT_PACKAGES)
    return root


def print_timings(label: str, started: float) -> None:
    timings["total"] = time.monotonic() - started
    size = subprocess.run(["du", "-sh", str(CACHE)], capture_output=True, text=True).stdout
    say(f"{label} timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    say(f"cache: {size.split()[0] if size else '?'} in {CACHE}")
