#!/bin/sh
# Entrypoint of the postgres:<major> stand-in that `deploy/image/local-bases.sh --postgres` makes
# for docker-compose.yml (the official image cannot be pulled here). It honours what the compose
# file uses of the official entrypoint: on an empty PGDATA, initdb with POSTGRES_USER (default
# postgres) and POSTGRES_PASSWORD (password auth over TCP, trust on the local socket), then
# POSTGRES_DB (default: the user's name) is created. Runs as root only long enough to own the
# data and socket directories, then as postgres. Arguments: `postgres [options]`, as the
# official image's CMD.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown -R postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  user="${POSTGRES_USER:-postgres}"
  database="${POSTGRES_DB:-$user}"
  : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (the official image refuses to start without one too)}"
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "$database" != postgres ]; then
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    createdb -U "$user" "$database"
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  fi
  echo "postgres stand-in: initialised $PGDATA (user $user, database $database)"
fi

if [ "${1:-postgres}" = postgres ]; then
  [ $# -eq 0 ] || shift
  exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
