#!/bin/bash
# Minimal re-implementation of the official postgres entrypoint contract:
# POSTGRES_USER / POSTGRES_PASSWORD(_FILE) / POSTGRES_DB, init on empty PGDATA.
set -Eeuo pipefail

# `docker run img -c foo=bar` -> postgres -c foo=bar
if [ "${1:0:1}" = '-' ]; then set -- postgres "$@"; fi
if [ "$1" != 'postgres' ]; then exec "$@"; fi

file_env() {  # VAR or VAR_FILE (docker secrets), not both
  local var="$1" fvar="${1}_FILE" def="${2:-}"
  if [ -n "${!var:-}" ] && [ -n "${!fvar:-}" ]; then
    echo >&2 "error: both $var and $fvar are set (but are exclusive)"; exit 1
  fi
  local val="$def"
  if [ -n "${!var:-}" ]; then val="${!var}"; elif [ -n "${!fvar:-}" ]; then val="$(< "${!fvar}")"; fi
  export "$var"="$val"; unset "$fvar"
}

PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA

# As root: fix ownership of (possibly fresh) volumes, then re-exec as postgres.
if [ "$(id -u)" = '0' ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
  [ -n "$(find "$PGDATA" -maxdepth 0 -empty)" ] || chown -R postgres:postgres "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  file_env POSTGRES_PASSWORD
  file_env POSTGRES_USER postgres
  file_env POSTGRES_DB "$POSTGRES_USER"
  : "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
  if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != 'trust' ]; then
    echo >&2 'error: database is uninitialized and POSTGRES_PASSWORD is not set'
    exit 1
  fi

  echo "initializing database cluster in $PGDATA"
  # PGDATA was empty: on a failed init, stop and empty it again so the next
  # start retries instead of running a half-initialised cluster.
  trap 'pg_ctl -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true; find "$PGDATA" -mindepth 1 -delete; echo >&2 "init failed; $PGDATA cleared"' ERR
  # Password via process substitution: never on a command line.
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
         --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD" \
         --encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-} >/dev/null
  printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"
  printf "\nlisten_addresses = '*'\n" >> "$PGDATA/postgresql.conf"

  # Temporary server on the unix socket only, so clients cannot connect mid-init.
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
  psql_init=(psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --no-password)
  if [ "$POSTGRES_DB" != 'postgres' ]; then
    # stdin, not -c: psql only interpolates :"var" in script input.
    echo 'CREATE DATABASE :"db";' | "${psql_init[@]}" --dbname postgres --set db="$POSTGRES_DB" -q
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)  echo "running $f"; . "$f" ;;
      *.sql) echo "running $f"; "${psql_init[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
      *) ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  trap - ERR
  unset POSTGRES_PASSWORD
  echo 'PostgreSQL init process complete; ready for start up.'
fi

exec "$@"
