#!/bin/sh
# Entry point of the stand-in PostgreSQL image (postgres.Dockerfile): on an empty data
# directory, initdb with the superuser POSTGRES_USER whose password is in POSTGRES_PASSWORD_FILE,
# password logins over TCP, the database POSTGRES_DB; then runs the command.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  tr -d '\n' <"$POSTGRES_PASSWORD_FILE" >"$pwfile"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "${POSTGRES_DB:-postgres}" != postgres ]; then
    postgres --single -D "$PGDATA" postgres >/dev/null <<SQL
CREATE DATABASE "$POSTGRES_DB" OWNER "$POSTGRES_USER";
SQL
  fi
fi
exec "$@"
