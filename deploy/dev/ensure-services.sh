#!/usr/bin/env bash
# Make sure RabbitMQ and PostgreSQL answer on loopback: start them when installed and stopped,
# install them from Debian's packages when run as root on a machine that lacks them.
# Idempotent; prints one line per service. Loopback only: tests never leave 127.0.0.0/8.
set -euo pipefail

log() { printf 'ensure-services: %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then log "cannot install $* (not root)"; return 1; fi
  if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------- RabbitMQ ----------
rabbit_ok() { port_open 5672 && rabbitmqctl -q await_startup >/dev/null 2>&1; }
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  log "installing rabbitmq-server"
  apt_install rabbitmq-server
  mkdir -p /etc/rabbitmq
  [ -f /etc/rabbitmq/rabbitmq-env.conf ] || cat >/etc/rabbitmq/rabbitmq-env.conf <<'CONF'
NODENAME=rabbit@localhost
NODE_IP_ADDRESS=127.0.0.1
export ERL_EPMD_ADDRESS=127.0.0.1
CONF
  [ -f /etc/rabbitmq/rabbitmq.conf ] || echo 'listeners.tcp.default = 127.0.0.1:5672' >/etc/rabbitmq/rabbitmq.conf
fi
if ! rabbit_ok; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do rabbit_ok && break; sleep 0.5; done
  # a node stopped with stop_app keeps running: start the app too
  rabbit_ok || { as_root rabbitmqctl start_app >/dev/null 2>&1 || true; sleep 2; }
fi
rabbit_ok || { log "RabbitMQ did not come up on 127.0.0.1:5672"; exit 1; }
log "RabbitMQ up on 127.0.0.1:5672"

# ---------- PostgreSQL ----------
pg_ok() { port_open 5432 && psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; }
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  log "installing postgresql"
  apt_install postgresql
fi
if ! pg_ok; then
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -z "$ver" ]; then log "no PostgreSQL cluster found"; exit 1; fi
  if ! grep -q '^host.*127.0.0.1/32.*trust' "/etc/postgresql/$ver/main/pg_hba.conf" 2>/dev/null; then
    # development/CI machines use trust auth on loopback only
    sed -i '1i host all all 127.0.0.1/32 trust' "/etc/postgresql/$ver/main/pg_hba.conf" || true
  fi
  log "starting PostgreSQL $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do pg_ok && break; sleep 0.5; done
fi
pg_ok || { log "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test' >/dev/null
log "PostgreSQL up on 127.0.0.1:5432"

# ---------- tools the TLS tests use (a throwaway CA) ----------
command -v openssl >/dev/null 2>&1 || { log "installing openssl"; apt_install openssl || true; }
