#!/usr/bin/env bash
# promtool, for the test that has Prometheus check deploy/monitoring's alert rules and example
# configuration (tests/unit/deploy/test_monitoring.py). Debian ships it only inside the
# `prometheus` package, whose install would also start a Prometheus server: this takes the one
# binary out of that package (apt-get download + dpkg-deb -x) into /usr/local/bin instead.
# Idempotent. Not root, no apt, or no mirror: says so and exits 0 (the test then skips, naming why).
set -uo pipefail
log() { printf 'ensure-promtool: %s\n' "$*"; }

command -v promtool >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  log "promtool missing and cannot be installed here (not root, or no apt-get)"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 0
# apt fetches as root here (it warns that _apt cannot write to this private dir; output is
# discarded): the directory stays private rather than opened to every user.
if ! apt-get download -qq prometheus >/dev/null 2>&1; then
  apt-get update -qq -o DPkg::Lock::Timeout=600 >/dev/null 2>&1
  apt-get download -qq prometheus >/dev/null 2>&1 || { log "apt-get download prometheus failed"; exit 0; }
fi
dpkg-deb -x prometheus_*.deb root && install -m 0755 root/usr/bin/promtool /usr/local/bin/promtool \
  && log "installed $(/usr/local/bin/promtool --version 2>&1 | head -n1)"
exit 0
