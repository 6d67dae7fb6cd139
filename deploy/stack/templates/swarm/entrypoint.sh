#!/bin/sh
# healthdeploy's task entrypoint on Docker Swarm (a Swarm config mounted at /healthdeploy/entrypoint; the
# stack file gives it the image's own entrypoint and command as arguments).
#
# 1. HEALTHDEPLOY_ENV_FILE: the service's secret half (a Swarm secret mounted as a file, KEY='value'
#    lines) is loaded into the environment of the command, never into the service's spec.
# 2. HEALTHDEPLOY_STOP_DELAY: a stop signal (TERM, INT or QUIT) is held back this many seconds before it
#    is passed on. Swarm takes a stopping task out of its DNS first; the gateway's sync sees that, takes
#    the task out of its upstream and drains it meanwhile, so the application only stops accepting once
#    nothing is sent to it any more. Without a delay the command is exec'd (signals go straight to it).
if [ -n "${HEALTHDEPLOY_ENV_FILE:-}" ]; then
  if [ ! -r "$HEALTHDEPLOY_ENV_FILE" ]; then
    echo "healthdeploy: cannot read $HEALTHDEPLOY_ENV_FILE (the service's secret)" >&2
    exit 78
  fi
  set -a
  . "$HEALTHDEPLOY_ENV_FILE"
  set +a
fi
unset HEALTHDEPLOY_ENV_FILE
delay=${HEALTHDEPLOY_STOP_DELAY:-0}
unset HEALTHDEPLOY_STOP_DELAY
[ $# -gt 0 ] || { echo "healthdeploy: no command to run" >&2; exit 78; }
case "$delay" in ''|0|0.0) exec "$@" ;; esac

"$@" &
child=$!
stopping=
pass_on() {
  [ -n "$stopping" ] && return
  stopping=$1
  echo "healthdeploy: SIG$1: still serving ${delay}s while the gateway drains this task" >&2
  sleep "$delay"
  kill -s "$1" "$child" 2>/dev/null
}
trap 'pass_on TERM' TERM
trap 'pass_on INT' INT
trap 'pass_on QUIT' QUIT
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || exit "$status"
done
