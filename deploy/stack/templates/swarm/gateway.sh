#!/bin/sh
# healthdeploy's gateway on Docker Swarm (a Swarm config mounted at /healthdeploy/gateway): nginx, and the
# sync that keeps each upstream file equal to the service's healthy tasks.
#
# Swarm's DNS lists a task of an endpoint_mode=dnsrr service only once it is healthy, and removes a
# stopping task before its stop signal (whose delivery healthdeploy's task entrypoint then holds back).
# Every HEALTHDEPLOY_SYNC_INTERVAL seconds each service is resolved; a file whose content changed is
# replaced atomically (rename), then `nginx -t` and a graceful reload: old workers finish their requests.
# A task that left stays in the upstream as a backup for HEALTHDEPLOY_DRAIN_TICKS rounds (tried only when a
# connect to a new one fails). An empty or failed lookup keeps the last known tasks.
#
# HEALTHDEPLOY_SERVICES: "service=upstream:port ...", e.g. "backend=backend:5000 ai-service=ai_service:8001".
# HEALTHDEPLOY_UPSTREAM_KEEPALIVE: idle upstream connections per worker (default 0, see render()).
set -u
conf=${HEALTHDEPLOY_GATEWAY_CONF:-/etc/healthdeploy-gateway/nginx.conf}
dir=$(dirname "$conf")/upstreams
state=/tmp/healthdeploy-gateway
interval=${HEALTHDEPLOY_SYNC_INTERVAL:-0.5}
ticks=${HEALTHDEPLOY_DRAIN_TICKS:-4}
mkdir -p "$state" "$dir"
log() { echo "gateway-sync: $*" >&2; }

lookup() {
  timeout 2 getent ahostsv4 "$1" 2>/dev/null | awk '{print $1}' | sort -u -t. -k1,1n -k2,2n -k3,3n -k4,4n | tr '\n' ' '
}

render() {  # service upstream port "ips" "backups"
  echo "# $1: written by healthdeploy's gateway sync from the healthy tasks of $1 (Swarm DNS). Do not edit."
  echo "upstream $2 {"
  if [ -z "$4" ]; then
    echo "    # No healthy task: answer 502 at once instead of hanging."
    echo "    server 127.0.0.1:9 down;"
  fi
  for ip in $4; do echo "    server $ip:$3 max_fails=0;"; done
  if [ -n "$4" ]; then
    for ip in $5; do
      echo "    # Leaving (its stop is held back until it has drained): tried only when a connect to the others fails."
      echo "    server $ip:$3 backup;"
    done
  fi
  # Idle connections kept per worker (HEALTHDEPLOY_UPSTREAM_KEEPALIVE, 0 = none): a node that is cut off
  # strands every request nginx sends on a connection it had pooled there, until the client gives up.
  [ "${HEALTHDEPLOY_UPSTREAM_KEEPALIVE:-0}" -gt 0 ] && echo "    keepalive $HEALTHDEPLOY_UPSTREAM_KEEPALIVE;"
  echo "}"
}

# One round; prints "changed" when an upstream file was replaced.
sync_round() {
  for entry in $HEALTHDEPLOY_SERVICES; do
    svc=${entry%%=*}; rest=${entry#*=}; name=${rest%%:*}; port=${rest#*:}
    prev=$(cat "$state/$svc.ips" 2>/dev/null || true)
    ips=$(lookup "$svc")
    [ -n "$ips" ] || ips=$prev
    : > "$state/$svc.leaving.new"
    for ip in $prev; do
      case " $ips " in *" $ip "*) ;; *) echo "$ip $ticks" >> "$state/$svc.leaving.new" ;; esac
    done
    if [ -f "$state/$svc.leaving" ]; then
      while read -r ip left; do
        case " $ips " in *" $ip "*) continue ;; esac
        [ "$left" -gt 1 ] && echo "$ip $((left - 1))" >> "$state/$svc.leaving.new"
      done < "$state/$svc.leaving"
    fi
    mv -f "$state/$svc.leaving.new" "$state/$svc.leaving"
    backups=$(awk '{print $1}' "$state/$svc.leaving" | sort -u | tr '\n' ' ')
    text=$(render "$svc" "$name" "$port" "$ips" "$backups")
    if [ "$text" != "$(cat "$dir/$svc.conf" 2>/dev/null)" ]; then
      printf '%s\n' "$text" > "$dir/.$svc.conf.tmp" && mv -f "$dir/.$svc.conf.tmp" "$dir/$svc.conf"
      log "$svc: tasks [${ips% }] leaving [${backups% }]"
      echo changed
    fi
    printf '%s' "$ips" > "$state/$svc.ips"
  done
}

reload() {
  if nginx -t -q -c "$conf" 2>"$state/nginx-t.err"; then
    nginx -s reload -c "$conf" 2>>"$state/nginx-t.err" || log "reload failed: $(tail -n 2 "$state/nginx-t.err" | tr '\n' ' ')"
  else
    log "nginx -t failed, not reloaded: $(tail -n 3 "$state/nginx-t.err" | tr '\n' ' ')"
  fi
}

sync_round >/dev/null
nginx -c "$conf" -g 'daemon off;' &
nginx_pid=$!
stopping=
trap 'stopping=1; kill -QUIT "$nginx_pid" 2>/dev/null' TERM QUIT INT
trap 'reload' HUP
while kill -0 "$nginx_pid" 2>/dev/null; do
  if [ -z "$stopping" ] && [ -n "$(sync_round)" ]; then
    reload
  fi
  touch "$state/beat"
  sleep "$interval" &
  wait $! 2>/dev/null
done
wait "$nginx_pid"
