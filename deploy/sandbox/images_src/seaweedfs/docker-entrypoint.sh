#!/bin/sh
# SeaweedFS `weed mini` (master+volume+filer+S3 in one process), S3 API on
# :9000. Credentials from MINIO_ROOT_USER / MINIO_ROOT_PASSWORD (the MinIO env
# contract), written to a 0600 identities file, never to argv.
# `weed mini`, not `weed server -s3`: the latter hung on SIGTERM (filer gRPC
# graceful stop never returned; docker had to SIGKILL) and needed ~10 s of
# raft re-election on every restart. mini stops in ~2 s and restarts in ~2 s.
set -eu

[ "${1:-}" = weed-s3 ] || exec "$@"
shift

if [ -z "${MINIO_ROOT_USER:-}" ] || [ -z "${MINIO_ROOT_PASSWORD:-}" ]; then
  echo >&2 'error: MINIO_ROOT_USER and MINIO_ROOT_PASSWORD must be set'
  exit 1
fi

if [ "$(id -u)" = 0 ]; then
  dir=/run/seaweedfs
  mkdir -p "$dir" /data
  chown seaweed:seaweed "$dir"
  [ "$(stat -c %U /data)" = seaweed ] || chown -R seaweed:seaweed /data
  run="setpriv --reuid=seaweed --regid=seaweed --init-groups"
else
  dir="${TMPDIR:-/tmp}"
  run=""
fi

umask 077
# python3 for correct JSON escaping; values come from the environment.
python3 - "$dir/s3.json" <<'PY'
import json, os, sys
ident = {"name": "root", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
         "credentials": [{"accessKey": os.environ["MINIO_ROOT_USER"],
                          "secretKey": os.environ["MINIO_ROOT_PASSWORD"]}]}
with open(sys.argv[1], "w") as f:
    json.dump({"identities": [ident]}, f)
PY
[ -z "$run" ] || chown seaweed:seaweed "$dir/s3.json"
unset MINIO_ROOT_PASSWORD

# mini binds every component to -ip.bind and always runs its admin server
# (:23646), so lock that with a throw-away random password. None of the
# non-S3 ports are published; only 9000 is part of the contract.
admin_pw="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"

# -logtostderr: glog would otherwise also write ever-growing files into /tmp.
exec $run weed -logtostderr mini \
  -dir=/data -ip=127.0.0.1 -ip.bind=0.0.0.0 \
  -master.telemetry=false \
  -s3.port=9000 -s3.config="$dir/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
  -webdav=false -admin.ui=false -admin.password="$admin_pw" \
  "$@"
