#!/bin/sh
# Runs redis-server in the foreground as user redis. The password comes from
# env REDIS_PASSWORD (or REDIS_PASSWORD_FILE) and is written to a 0600 config
# file, so it never appears on a command line (ps / docker inspect Args).
set -eu

# `docker run img --maxmemory 1mb` -> redis-server --maxmemory 1mb
case "${1:-}" in -*) set -- redis-server "$@" ;; esac
[ "${1:-}" = redis-server ] || exec "$@"
shift
case "${1:-}" in -v|--version|-h|--help) exec redis-server "$@" ;; esac

if [ -z "${REDIS_PASSWORD:-}" ] && [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
  REDIS_PASSWORD="$(cat "$REDIS_PASSWORD_FILE")"
fi

if [ "$(id -u)" = 0 ]; then
  conf_dir=/run/redis
  mkdir -p "$conf_dir" /data
  chown redis:redis "$conf_dir"
  # Fresh named volumes are root-owned; redis must own its dir.
  [ "$(stat -c %U /data)" = redis ] || chown -R redis:redis /data
  run="setpriv --reuid=redis --regid=redis --init-groups"
else
  conf_dir="${TMPDIR:-/tmp}"   # started with `user:`; /run/redis may not be ours
  run=""
fi

conf="$conf_dir/redis.conf"
umask 077
{
  echo 'bind 0.0.0.0'
  echo 'protected-mode no'
  echo 'port 6379'
  echo 'dir /data'
  echo 'appendonly yes'
  echo 'daemonize no'
  echo 'logfile ""'
  if [ -n "${REDIS_PASSWORD:-}" ]; then
    # Double-quoted redis string: escape backslash and double quote.
    printf 'requirepass "%s"\n' "$(printf '%s' "$REDIS_PASSWORD" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
  fi
} > "$conf"
[ -z "$run" ] || chown redis:redis "$conf"
unset REDIS_PASSWORD REDIS_PASSWORD_FILE

exec $run redis-server "$conf" "$@"
