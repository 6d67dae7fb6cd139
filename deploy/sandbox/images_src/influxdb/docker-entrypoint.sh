#!/bin/bash
# influxd in the foreground as user influxdb. Like the official influxdb:1.x image:
# - INFLUX_DB (or INFLUXDB_DB): that database is created on first start;
# - INFLUXDB_HTTP_AUTH_ENABLED=true with INFLUXDB_ADMIN_USER / INFLUXDB_ADMIN_PASSWORD: HTTP auth on, and
#   that admin user made (or its password set: a rotated INFLUX_PASSWORD takes effect at the next start).
# The set-up runs against a temporary server on 127.0.0.1:18086 with auth off, inside the container only
# (health checks on 8086 never see it). Statements holding the password reach curl on stdin (printf is a
# shell builtin), never as an argument: the host's `ps` shows every container process's arguments.
set -Eeuo pipefail

case "${1:-}" in -*) set -- influxd "$@" ;; esac
# Only the bare server start is wrapped; `influxd backup|restore|version ...` pass through.
if [ "${1:-}" != influxd ] || { [ $# -gt 1 ] && [ "${2:0:1}" != - ]; }; then exec "$@"; fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p /var/lib/influxdb
  [ "$(stat -c %U /var/lib/influxdb)" = influxdb ] || chown -R influxdb:influxdb /var/lib/influxdb
  exec setpriv --reuid=influxdb --regid=influxdb --init-groups "$BASH_SOURCE" "$@"
fi

db="${INFLUX_DB:-${INFLUXDB_DB:-}}"
auth=false
case "${INFLUXDB_HTTP_AUTH_ENABLED:-false}" in true|TRUE|True|1) auth=true ;; esac
admin="${INFLUXDB_ADMIN_USER:-admin}"
password="${INFLUXDB_ADMIN_PASSWORD:-}"
if [ "$auth" = true ] && [ -z "$password" ]; then
  echo >&2 'INFLUXDB_HTTP_AUTH_ENABLED=true needs INFLUXDB_ADMIN_PASSWORD (the admin user to create)'; exit 1
fi

setup=""
[ -n "$db" ] && [ ! -f /var/lib/influxdb/meta/meta.db ] && setup=1
[ "$auth" = true ] && setup=1
if [ -n "$setup" ]; then
  INFLUXDB_HTTP_BIND_ADDRESS=127.0.0.1:18086 INFLUXDB_HTTP_AUTH_ENABLED=false "$@" &
  pid=$!
  for _ in $(seq 1 60); do
    curl -fsS -o /dev/null http://127.0.0.1:18086/ping 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo >&2 'influxd exited during init'; exit 1; }
    sleep 0.5
  done
  q() { curl -fsS -XPOST http://127.0.0.1:18086/query --data-urlencode "q@-"; }
  if [ -n "$db" ]; then
    # Quote the identifier; CREATE DATABASE is idempotent.
    printf 'CREATE DATABASE "%s"' "${db//\"/\\\"}" | q >/dev/null
    echo "created database $db"
  fi
  if [ "$auth" = true ]; then
    users=$(printf 'SHOW USERS' | q)
    if printf '%s' "$users" | grep -q "\[\"${admin}\","; then
      printf "SET PASSWORD FOR \"%s\" = '%s'" "$admin" "$password" | q >/dev/null
      printf 'GRANT ALL PRIVILEGES TO "%s"' "$admin" | q >/dev/null
      echo "admin user $admin: password set from the environment"
    else
      printf "CREATE USER \"%s\" WITH PASSWORD '%s' WITH ALL PRIVILEGES" "$admin" "$password" | q >/dev/null
      echo "admin user $admin created"
    fi
  fi
  kill -TERM "$pid"; wait "$pid" || true
fi
unset INFLUXDB_ADMIN_PASSWORD password

exec "$@"
