#!/bin/bash
# The systemd half of `make test-deploy` (issue 17), run INSIDE the booted container by
# fleet-deploy-check.service (a oneshot with SuccessAction=exit / FailureAction=exit, so the
# container, and systemd-nspawn on the host, exit with this script's status).
#
# It installs Fleet as docs/operations.md ("systemd") says, from the repository mounted read-only
# at /opt/fleet-src and the per-run files the host driver (tests/deploy/systemd_nspawn.py) wrote
# to /srv/fleet-test/in, then checks what the units promise, printing one line per check:
#   PASS|FAIL <check>: <what was seen>
# /srv/fleet-test/out (read-write) carries the report and the fleetctl handshake to the host.
set -uo pipefail

IN=/srv/fleet-test/in
OUT=/srv/fleet-test/out
SRC=/opt/fleet-src
CONDUCTOR=fleet-conductor.service
AGENT1=fleet-compute-agent.service
AGENT2=fleet-compute-agent-2.service
FAILED=0

say() { printf '%s\n' "$*" | tee -a "$OUT/report"; }
pass() { say "PASS $1: $2"; }
fail() { say "FAIL $1: $2"; FAILED=1; }
prop() { systemctl show -P "$2" "$1"; }
# Wait up to $1 seconds for the command to succeed.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.5
  done
}
journal_since() { journalctl -q -o cat -u "$1" --since "$2"; }
now() { date '+%Y-%m-%d %H:%M:%S'; }
finish() {
  if [ $FAILED != 0 ]; then
    journalctl -q -o short-monotonic -u 'fleet-*' -n 200 >"$OUT/journal.txt" 2>&1
  fi
  say "RESULT $([ $FAILED = 0 ] && echo PASS || echo FAIL) (checks took $SECONDS s)"
  exit $FAILED
}

# --- install, as docs/operations.md "systemd" describes ---------------------------------------
install_fleet() {
  /opt/fleet-venv/bin/pip install -q --no-index --no-deps "$IN"/wheels/fleet-*.whl
  for p in conductor compute-agent fleetctl; do ln -sf "/opt/fleet-venv/bin/$p" "/usr/local/bin/$p"; done
  # -D: a system may have no /etc/sysusers.d yet (Debian's minimal one has none).
  install -D -m 0644 "$SRC/deploy/systemd/fleet.sysusers.conf" /etc/sysusers.d/fleet.conf
  systemd-sysusers
  install -d -m 0750 -g fleet /etc/fleet
  install -m 0640 -g fleet "$SRC/deploy/fleet.toml.example" /etc/fleet/fleet.toml
  install -m 0640 -g fleet "$IN/etc/fleet.env" /etc/fleet/fleet.env
  install -d -m 0700 /etc/fleet/credentials /etc/fleet/compute-1 /etc/fleet/compute-2
  install -m 0600 "$IN/etc/conductor/transport_url" "$IN/etc/conductor/database_url" /etc/fleet/credentials/
  install -m 0600 "$IN/etc/compute-1/transport_url" /etc/fleet/compute-1/
  install -m 0600 "$IN/etc/compute-2/transport_url" /etc/fleet/compute-2/
  install -m 0644 "$SRC"/deploy/systemd/fleet-*.service /etc/systemd/system/
  # The second agent on this machine is a copy of the shipped unit; its drop-in gives it its own
  # host name, credential and state directory (one machine stands in for two hypervisor hosts).
  install -m 0644 "$SRC/deploy/systemd/fleet-compute-agent.service" "/etc/systemd/system/$AGENT2"
  local d
  for d in "$IN"/dropins/*.d; do
    install -d "/etc/systemd/system/$(basename "$d")"
    install -m 0644 "$d"/*.conf "/etc/systemd/system/$(basename "$d")/"
  done
  systemctl daemon-reload
}
if (set -e; install_fleet) >"$OUT/install.log" 2>&1; then
  pass install "wheel, sysusers (user $(id -u fleet):$(id -g fleet)), /etc/fleet, credentials, units"
else
  fail install "see install.log"; finish
fi

# --- 1. both services reach active through READY=1 ---------------------------------------------
start_unit() {
  local unit=$1 t0=$SECONDS
  if systemctl start "$unit"; then
    local st; st=$(prop "$unit" ActiveState)/$(prop "$unit" SubState)
    if [ "$st" = active/running ]; then
      pass "ready $unit" "$st after $((SECONDS - t0)) s (Type=$(prop "$unit" Type)), status: $(prop "$unit" StatusText)"
      return 0
    fi
  fi
  fail "ready $unit" "$(prop "$unit" ActiveState)/$(prop "$unit" SubState) result=$(prop "$unit" Result)"
  return 1
}
start_unit $CONDUCTOR || finish
start_unit $AGENT1 || finish
start_unit $AGENT2 || finish

# systemd ignores (with a warning) a directive it does not know or cannot apply: none may be.
# (Checked once the units are loaded: systemd parses a unit when something first refers to it.)
warnings=$(journalctl -q -b -o cat | grep -E 'fleet-[^ :]*\.(service|conf):[0-9]+:' || true)
if [ -z "$warnings" ]; then
  pass "units parsed" "no warning about the fleet units from this systemd ($(systemctl --version | head -1))"
else
  fail "units parsed" "$warnings"
fi

# --- 2. secrets arrive through LoadCredential, nowhere else ------------------------------------
password_of() { sed -E 's#^[a-z+]+://[^:/@]*:([^@]*)@.*#\1#' "$1"; }
check_credentials() {
  local unit=$1 pid dir found=""
  pid=$(prop "$unit" MainPID)
  dir=/run/credentials/$unit
  shift
  local file
  for file in "$@"; do
    local pw; pw=$(password_of "$file")
    [ -n "$pw" ] && [ "$pw" != "$(cat "$file")" ] || { fail "credentials $unit" "no password in $file"; return; }
    grep -qF -- "$pw" "/proc/$pid/environ" && found+=" environ"
    systemctl show "$unit" | grep -qF -- "$pw" && found+=" systemctl-show"
    grep -rqF -- "$pw" /etc/systemd/system/fleet-* /etc/fleet/fleet.env /etc/fleet/fleet.toml && found+=" unit/env files"
    cmp -s "$file" "$dir/$(basename "$file")" || found+=" (credential $(basename "$file") missing)"
  done
  if [ -z "$found" ]; then
    pass "credentials $unit" "$(ls "$dir" | tr '\n' ' ')in $dir (mode $(stat -c %a "$dir"/* | sort -u | tr '\n' ' ')), no password in environ, systemctl show or unit/env files"
  else
    fail "credentials $unit" "password seen in:$found"
  fi
}
check_credentials $CONDUCTOR /etc/fleet/credentials/transport_url /etc/fleet/credentials/database_url
check_credentials $AGENT1 /etc/fleet/compute-1/transport_url
check_credentials $AGENT2 /etc/fleet/compute-2/transport_url

# --- 3. hardening in force, probed inside each service's own namespaces -------------------------
# As root in the service's mount namespace (a root write that fails there fails because the
# mount is read-only, not for want of rights), and as the service's user in it (setpriv: this
# nsenter has no -S follow).
in_service() {
  local uid gid
  uid=$(awk '/^Uid:/ {print $2}' "/proc/$1/status"); gid=$(awk '/^Gid:/ {print $2}' "/proc/$1/status")
  nsenter -t "$1" -m setpriv --reuid="$uid" --regid="$gid" --clear-groups "${@:2}"
}
in_mounts() { nsenter -t "$1" -m "${@:2}"; }
check_hardening() {
  local unit=$1 state=$2 pid bad="" seen=""
  pid=$(prop "$unit" MainPID)
  local err dir
  for dir in /etc /usr /var/lib; do
    if err=$(in_mounts "$pid" touch "$dir/fleet-probe" 2>&1); then
      in_mounts "$pid" rm -f "$dir/fleet-probe"; bad+=" $dir writable;"
    else
      seen+="write $dir as root: ${err##*: }; "
    fi
  done
  if in_service "$pid" sh -c "touch $state/.probe && rm $state/.probe" 2>/dev/null; then seen+="write $state as the service: ok; "; else bad+=" state dir not writable;"; fi
  local mode; mode=$(in_mounts "$pid" stat -c %a /root /home | sort -u | tr '\n' ' ')
  [ "$mode" = "0 " ] && seen+="/root, /home: mode 0; " || bad+=" ProtectHome not in force (modes $mode);"
  local status; status=$(cat "/proc/$pid/status")
  grep -q '^NoNewPrivs:[[:space:]]*1' <<<"$status" || bad+=" NoNewPrivs off;"
  grep -q '^Seccomp:[[:space:]]*2' <<<"$status" || bad+=" no seccomp filter;"
  # SystemCallFilter, MemoryDenyWriteExecute, RestrictAddressFamilies, RestrictNamespaces, ...
  # each load seccomp filters of their own.
  local filters; filters=$(awk '/^Seccomp_filters:/ {print $2}' <<<"$status")
  grep -q '^CapEff:[[:space:]]*0000000000000000' <<<"$status" || bad+=" capabilities left;"
  grep -q '^CapBnd:[[:space:]]*0000000000000000' <<<"$status" || bad+=" bounding set not empty;"
  local uidmap; uidmap=$(awk '{printf "%s:%s:%s ", $1, $2, $3}' "/proc/$pid/uid_map")
  [ "$(wc -l <"/proc/$pid/uid_map")" -le 2 ] || bad+=" PrivateUsers not in force (uid_map $uidmap);"
  [ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/1/ns/mnt)" ] || bad+=" no private mount namespace;"
  [ "$(readlink "/proc/$pid/ns/ipc")" != "$(readlink /proc/1/ns/ipc)" ] || bad+=" no private IPC namespace;"
  local tmp_host tmp_svc
  tmp_host=$(stat -c %i /tmp); tmp_svc=$(in_mounts "$pid" stat -c %i /tmp)
  [ "$tmp_host" != "$tmp_svc" ] || bad+=" /tmp shared;"
  local score; score=$(systemd-analyze security "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: //p')
  seen+="NoNewPrivs, seccomp (${filters:-?} filters), no capabilities, uid_map $uidmap, private mnt/ipc/tmp; exposure $score"
  if [ -z "$bad" ]; then pass "hardening $unit" "$seen"; else fail "hardening $unit" "$bad ($seen)"; fi
}
check_hardening $CONDUCTOR /var/lib/fleet
check_hardening $AGENT1 /var/lib/fleet
check_hardening $AGENT2 /var/lib/fleet-compute-2

# --- 4. systemctl reload reaches the service (SIGHUP re-reads the upgrade levels) ---------------
check_reload() {
  local unit=$1 event=$2 pid since
  pid=$(prop "$unit" MainPID); since=$(now); sleep 1
  if systemctl reload "$unit" && wait_for 20 sh -c "journalctl -q -o cat -u $unit --since '$since' | grep -q '\"$event\"'"; then
    local line; line=$(journal_since "$unit" "$since" | grep "\"$event\"" | tail -1)
    if [ "$(prop "$unit" MainPID)" = "$pid" ] && [ "$(prop "$unit" ActiveState)" = active ]; then
      pass "reload $unit" "same PID $pid, logged: $line"
    else
      fail "reload $unit" "PID or state changed"
    fi
  else
    fail "reload $unit" "no $event in the journal within 20 s"
  fi
}
check_reload $CONDUCTOR conductor_reload
check_reload $AGENT1 compute_agent_reload

# --- 5. a blocked event loop is killed by the watchdog and restarted ---------------------------
# SIGSTOP freezes the whole process, so its event loop sends no WATCHDOG=1 any more: what an
# event loop stuck in a blocking call looks like from outside. systemd sends SIGABRT (then
# SIGCONT) after WatchdogSec and restarts the service (Restart=on-failure).
check_watchdog() {
  local unit=$1 pid n0 since t0
  pid=$(prop "$unit" MainPID); n0=$(prop "$unit" NRestarts); since=$(now); t0=$SECONDS
  kill -STOP "$pid"
  restarted() {
    [ "$(prop "$unit" NRestarts)" -gt "$n0" ] && [ "$(prop "$unit" ActiveState)" = active ] &&
      [ "$(prop "$unit" SubState)" = running ] && [ "$(prop "$unit" MainPID)" != "$pid" ]
  }
  if wait_for 120 restarted; then
    local why; why=$(journalctl -q -o cat --since "$since" | grep -m1 -i 'watchdog timeout' || true)
    if [ -n "$why" ]; then
      pass "watchdog $unit" "loop frozen (PID $pid), killed and restarted after $((SECONDS - t0)) s (WatchdogSec=$(prop "$unit" WatchdogUSec)); NRestarts $n0 -> $(prop "$unit" NRestarts), new PID $(prop "$unit" MainPID), active again; journal: $why"
    else
      fail "watchdog $unit" "restarted, but no watchdog timeout in the journal"
    fi
  else
    kill -CONT "$pid" 2>/dev/null
    fail "watchdog $unit" "not restarted within 120 s: $(prop "$unit" ActiveState)/$(prop "$unit" SubState) NRestarts=$(prop "$unit" NRestarts)"
  fi
}
check_watchdog $CONDUCTOR

# --- 6. the fleet works through the restarted conductor: fleetctl on the host -------------------
echo ready >"$OUT/fleetctl.request"
if wait_for 300 test -e "$OUT/fleetctl.done"; then
  if [ "$(cat "$OUT/fleetctl.done")" = 0 ]; then
    pass fleetctl "the host's fleetctl booted on both agents and live-migrated (its output above)"
  else
    fail fleetctl "the host's fleetctl failed (its output above)"
  fi
else
  fail fleetctl "no answer from the host within 300 s"
fi

# --- 7. a configuration error exits 2 and is not restarted --------------------------------------
check_config_error() {
  local unit=$CONDUCTOR since dropin=/run/systemd/system/$CONDUCTOR.d/90-deploy-test-bad.conf
  install -d "$(dirname "$dropin")"
  printf '[Service]\nEnvironment=FLEET_METRICS_PORT=auto\n' >"$dropin"
  systemctl daemon-reload
  since=$(now); sleep 1
  systemctl restart "$unit" 2>/dev/null && { fail "config error" "restart succeeded"; return; }
  sleep 8 # RestartSec=2s: four restarts' worth
  local errors; errors=$(journal_since "$unit" "$since" | grep -c 'configuration error' || true)
  local st="$(prop "$unit" ActiveState) status=$(prop "$unit" ExecMainStatus) result=$(prop "$unit" Result)"
  local line; line=$(journal_since "$unit" "$since" | grep -m1 'configuration error' || true)
  if [ "$st" = "failed status=2 result=exit-code" ] && [ "$errors" = 1 ]; then
    pass "config error" "$st, started once in 8 s (no restart loop): $line"
  else
    fail "config error" "$st, configuration error logged $errors time(s): $line"
  fi
  rm -f "$dropin"; systemctl daemon-reload; systemctl reset-failed "$unit"
  if systemctl start "$unit"; then
    pass "config fixed" "drop-in removed, systemctl start: $(prop "$unit" ActiveState)/$(prop "$unit" SubState)"
  else
    fail "config fixed" "did not start again: $(prop "$unit" Result)"
  fi
}
check_config_error

# --- 8. a clean stop: SIGTERM drains, exit 0 ----------------------------------------------------
for unit in $AGENT2 $AGENT1 $CONDUCTOR; do
  t0=$SECONDS
  systemctl stop "$unit"
  r="result=$(prop "$unit" Result) status=$(prop "$unit" ExecMainStatus)"
  if [ "$r" = "result=success status=0" ]; then
    pass "stop $unit" "$r in $((SECONDS - t0)) s"
  else
    fail "stop $unit" "$r"
  fi
done
finish
