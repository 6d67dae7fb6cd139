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

# Sets $ips: the IPv4 addresses of service $1's healthy tasks (Swarm DNS), those already known ($2) in their
# known order, then new ones, so a set that did not change renders the same file. This runs for every service
# every round: only the lookup itself forks (timeout, getent); the rest is shell builtins.
lookup() {
  answer=$(timeout 2 getent ahostsv4 "$1" 2>/dev/null) || answer=
  found=
  for word in $answer; do  # "IP STREAM name", "IP DGRAM", "IP RAW" per address
    case "$word" in *[!0-9.]* | "") continue ;; esac
    case " $found " in *" $word "*) ;; *) found="$found $word" ;; esac
  done
  ips=
  for ip in $2; do case " $found " in *" $ip "*) ips="$ips $ip" ;; esac; done
  for ip in $found; do case " $ips " in *" $ip "*) ;; *) ips="$ips $ip" ;; esac; done
  ips=${ips# }
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

read_file() {  # $1 = variable, $2 = file: its first line, or empty (a builtin, no cat)
  eval "$1="
  [ -f "$2" ] && IFS= read -r "$1" < "$2"
  return 0
}

# One round; prints "changed" when an upstream file was replaced. State lives in files (a round runs in a
# subshell): the tasks seen last round, the leaving ones with their rounds left, the last rendered key.
sync_round() {
  for entry in $HEALTHDEPLOY_SERVICES; do
    svc=${entry%%=*}; rest=${entry#*=}; name=${rest%%:*}; port=${rest#*:}
    read_file prev "$state/$svc.ips"
    lookup "$svc" "$prev"
    [ -n "$ips" ] || ips=$prev
    leaving=
    for ip in $prev; do
      case " $ips " in *" $ip "*) ;; *) leaving="$leaving $ip:$ticks" ;; esac
    done
    read_file before "$state/$svc.leaving"
    for item in $before; do
      ip=${item%%:*}; left=${item#*:}
      case " $ips $leaving " in *" $ip "* | *" $ip:"*) continue ;; esac
      [ "$left" -gt 1 ] && leaving="$leaving $ip:$((left - 1))"
    done
    [ "$leaving" = "$before" ] || printf '%s\n' "$leaving" > "$state/$svc.leaving"
    backups=
    for item in $leaving; do backups="$backups ${item%%:*}"; done
    backups=${backups# }
    read_file rendered "$state/$svc.rendered"
    if [ "$ips|$backups" != "$rendered" ] || [ ! -f "$dir/$svc.conf" ]; then
      # The key is kept only once the file is in place: a failed write (disk full) is tried again next round.
      if render "$svc" "$name" "$port" "$ips" "$backups" > "$dir/.$svc.conf.tmp" \
          && mv -f "$dir/.$svc.conf.tmp" "$dir/$svc.conf"; then
        printf '%s\n' "$ips|$backups" > "$state/$svc.rendered"
        log "$svc: tasks [$ips] leaving [$backups]"
        echo changed
      else
        log "$svc: could not write $dir/$svc.conf: tried again next round"
      fi
    fi
    [ "$ips" = "$prev" ] || printf '%s\n' "$ips" > "$state/$svc.ips"
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
[ "${HEALTHDEPLOY_SYNC_ONCE:-}" = 1 ] && exit 0  # the offline tests: one round, no nginx
nginx -c "$conf" -g 'daemon off;' &
nginx_pid=$!
stopping=
round=0
trap 'stopping=1; kill -QUIT "$nginx_pid" 2>/dev/null' TERM QUIT INT
trap 'reload' HUP
while kill -0 "$nginx_pid" 2>/dev/null; do
  if [ -z "$stopping" ] && [ -n "$(sync_round)" ]; then
    reload
  fi
  round=$((round + 1))
  printf '%s\n' "$round" > "$state/beat"  # the health check reads its time (a builtin write, no touch)
  sleep "$interval" &
  wait $! 2>/dev/null
done
wait "$nginx_pid"
