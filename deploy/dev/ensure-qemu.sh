#!/usr/bin/env bash
# Make this machine able to run real guests (docs/virt.md §9): QEMU and busybox-static from
# Debian's packages (installed when run as root and missing), then the guest image, cached in
# ~/.cache/fleet/images (FLEET_COMPUTE__QEMU_IMAGE_DIR). Idempotent; ~10 s the first time.
# Usage: ensure-qemu.sh PYTHON [image build args, e.g. --force]
# Exit 77: this machine cannot run guests (not root and QEMU missing, no apt, image not built);
# the QEMU tests then skip with the reason, and `make test` says so in a SKIPPED line.
set -uo pipefail

PY=${1:?usage: ensure-qemu.sh PYTHON [build args]}
shift
log() { printf 'ensure-qemu: %s\n' "$*"; }

missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "cannot install ${missing[*]} (not root, or no apt-get)"
    exit 77
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Another apt run (a parallel job) holds the lock for a while: wait for it, not fail.
  apt_opts=(-y -qq -o DPkg::Lock::Timeout=600)
  if ! { apt-get update -qq -o DPkg::Lock::Timeout=600 \
        && apt-get install "${apt_opts[@]}" --no-install-recommends "${missing[@]}" >/dev/null; }; then
    log "apt-get could not install ${missing[*]}"
    exit 77
  fi
fi
if ! "$PY" -m compute_agent.virt.qemu build "$@"; then
  log "the guest image could not be built (see above)"
  exit 77
fi
log "QEMU $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}') and the guest image ready"
