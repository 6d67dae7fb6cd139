#!/bin/bash
# influxd in the foreground as user influxdb. Optional env INFLUX_DB (or the
# official image's INFLUXDB_DB) creates that database on first start.
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
if [ -n "$db" ] && [ ! -f /var/lib/influxdb/meta/meta.db ]; then
  # Temporary server on loopback only, like the official image's init phase.
  INFLUXDB_HTTP_BIND_ADDRESS=127.0.0.1:8086 "$@" &
  pid=$!
  for _ in $(seq 1 60); do
    curl -fsS -o /dev/null http://127.0.0.1:8086/ping 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo >&2 'influxd exited during init'; exit 1; }
    sleep 0.5
  done
  # Quote the identifier; CREATE DATABASE is idempotent.
  q="CREATE DATABASE \"${db//\"/\\\"}\""
  curl -fsS -o /dev/null -XPOST http://127.0.0.1:8086/query --data-urlencode "q=$q"
  echo "created database $db"
  kill -TERM "$pid"; wait "$pid" || true
fi

exec "$@"
