"""Backup command builders: each engine's own consistent logical dump, run inside its container,
writing the artifact to stdout (the executor streams and checksums it). Credentials are read from the
container's own environment inside the container, never put on a command line."""

from __future__ import annotations

import json

from .base import Command, cmd


# A data service's secret half is mounted at /run/healthdeploy/secrets.env (Compose: postgres and redis;
# Swarm: every service with a secret, whose container environment then holds none of it): a command run
# in the container with `docker exec` loads it first, as the service's own process did.
SECRETS_PRELUDE = ("if [ -r /run/healthdeploy/secrets.env ]; then set -a; . /run/healthdeploy/secrets.env; "
                   "set +a; fi\n")


def _in(container: str, script_body: str, *args: str, description: str, readonly: bool = True) -> Command:
    return cmd("docker", "exec", "-i", container, "sh", "-c", SECRETS_PRELUDE + script_body, "sh", *args,
               description=description, readonly=readonly)


# PostgreSQL: the custom format (compressed, restorable table by table) through the local socket
# (trust inside the container), as the application's user.
# The row count of every table is taken in the very snapshot pg_dump dumps (exported by a session
# held open meanwhile), and reported on stderr, so the manifest records exactly what the dump holds.
ROW_COUNT_SQL = (
    "SELECT format('SELECT %L || '' '' || count(*) FROM %I.%I', schemaname || '.' || relname, schemaname, relname) "
    "FROM pg_stat_user_tables ORDER BY 1 \\gexec"
)

# Each dump script reports its engine's version on stderr first (no separate round trip for it).
VERSION_LINE = "HEALTHDEPLOY-VERSION "

POSTGRES_DUMP = r"""set -e
echo "HEALTHDEPLOY-VERSION $(postgres --version 2>/dev/null || pg_dump --version)" >&2
coproc PSQL { psql -X -q -t -A -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB"; }
echo "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_export_snapshot();" >&"${PSQL[1]}"
read -r snapshot <&"${PSQL[0]}"
# The exporting session counts the rows (same snapshot) while pg_dump runs: another backend, another core.
# The snapshot lives until that session commits, after pg_dump is done.
printf '%s\n' "$1" "SELECT 'HEALTHDEPLOY-END';" >&"${PSQL[1]}"
pg_dump -Fc --snapshot="$snapshot" -U "$POSTGRES_USER" -d "$POSTGRES_DB"
while read -r line <&"${PSQL[0]}"; do
  [ "$line" = HEALTHDEPLOY-END ] && break
  echo "HEALTHDEPLOY-ROWS $line" >&2
done
echo "COMMIT;" >&"${PSQL[1]}"
exec {PSQL[1]}>&-
wait
"""

ROW_COUNTS = r"""printf '%s\n' "$1" | psql -X -q -t -A -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "${2:-$POSTGRES_DB}" | sed 's/^/HEALTHDEPLOY-ROWS /'"""


def postgres_dump(container: str) -> Command:
    return cmd("docker", "exec", "-i", container, "bash", "-c", POSTGRES_DUMP, "bash", ROW_COUNT_SQL,
               description="pg_dump", readonly=True)


def postgres_row_counts(container: str, database: str = "") -> Command:
    return _in(container, ROW_COUNTS, ROW_COUNT_SQL, database,
               description="count rows per table").tagged("pg-rows", database)


def postgres_globals(container: str) -> Command:
    return _in(container, 'echo "HEALTHDEPLOY-VERSION $(pg_dumpall --version)" >&2; '
                          'exec pg_dumpall --globals-only -U "$POSTGRES_USER"', description="pg_dumpall --globals-only")



# InfluxDB 1.x runs with HTTP auth (INFLUXDB_HTTP_AUTH_ENABLED=true and an admin user, see render.py). Every
# HTTP query authenticates as that user with the credentials in the container's own environment, handed to
# curl as a config on its stdin (printf is a shell builtin): never an argument. Without them (the drill's
# throwaway server: no network, auth off) curl sends none. `influxd backup/restore` use the RPC port 8088,
# which has no auth in 1.x and listens on the container's loopback only.
INFLUX1_CURL = r"""
icurl() {
  if [ -n "${INFLUXDB_ADMIN_PASSWORD:-}" ]; then
    printf 'user = "%s:%s"\n' "${INFLUXDB_ADMIN_USER:-admin}" "$INFLUXDB_ADMIN_PASSWORD" | curl -K - "$@"
  else
    curl "$@"
  fi
}
"""

# InfluxDB 1.x: a portable backup of the database into a temporary directory, streamed as a tar.
# Before the backup, the points per retention policy, measurement and field up to a cut-off time T0, the
# series per measurement, the retention policies and the continuous queries are recorded (stderr): everything
# up to T0 is in the backup, so a drill or a restore can compare.
#
# Every InfluxDB HTTP call goes through influx_http (one place for authentication). A statement that InfluxDB
# answers with {"error": ...} (HTTP 200) fails; "shard is disabled" (restored shards not open yet) is retried.
INFLUX1_HTTP = INFLUX1_CURL + r"""
influx_http() {  # METHOD DB QUERY -> the response body on stdout
  m=$1; shift
  if [ "$m" = GET ]; then set -- -G "$@"; else set -- -XPOST "$@"; fi
  icurl -sS "$1" http://127.0.0.1:8086/query ${2:+--data-urlencode "db=$2"} --data-urlencode "q=$3"
}
influx_q() {  # METHOD DB QUERY: the body (one line); fails on an error answer, retries disabled shards
  i=0
  while :; do
    out=$(influx_http "$1" "$2" "$3") || { echo "influx: $3: the query failed" >&2; return 1; }
    case "$out" in
      *'shard is disabled'*|*'engine is closed'*)
        i=$((i + 1)); [ "$i" -lt 240 ] || { echo "influx: $3: shards still disabled after 120 s" >&2; return 1; }
        sleep 0.5; continue ;;
      *'"error"'*) echo "influx: $3: $out" >&2; return 1 ;;
    esac
    printf '%s\n' "$out" | tr -d '\n'; echo
    return 0
  done
}
influx_rps() {  # DB: its retention policy names, one a line
  influx_q GET "$1" "SHOW RETENTION POLICIES" | grep -o '\["[^"]*","[^"]*","[^"]*",[0-9]*,\(true\|false\)\]' \
    | sed 's/^\["\([^"]*\)".*/\1/'
}
"""

INFLUX1_COUNTS = INFLUX1_HTTP + r"""
influx_counts() {  # DB T0: structured lines on stderr
  rps=$(influx_q GET "$1" "SHOW RETENTION POLICIES") || return 1
  echo "HEALTHDEPLOY-INFLUX-RPS $rps" >&2
  cqs=$(influx_q GET "" "SHOW CONTINUOUS QUERIES") || return 1
  echo "HEALTHDEPLOY-INFLUX-CQS $cqs" >&2
  for rp in $(influx_rps "$1"); do
    out=$(influx_q GET "$1" "SELECT count(*) FROM \"$rp\"./.*/ WHERE time <= '$2'") || return 1
    echo "HEALTHDEPLOY-INFLUX-RP $rp $out" >&2
  done
  out=$(influx_q GET "$1" "SHOW SERIES EXACT CARDINALITY") || return 1
  echo "HEALTHDEPLOY-INFLUX $out" >&2
}
"""

# The cut-off, the counts and the backup are taken in this order; the portable backup is written into the
# container's /tmp (influxd has no streaming backup), so its free space is checked first against the
# database's size on disk.
INFLUX1_BACKUP = INFLUX1_COUNTS + r"""set -e
echo "HEALTHDEPLOY-VERSION $(influxd version 2>/dev/null)" >&2
t0=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "HEALTHDEPLOY-T0 $t0" >&2
influx_counts "$1" "$t0"
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
need=$(du -sk "/var/lib/influxdb/data/$1" 2>/dev/null | cut -f1); need=${need:-0}
free=$(df -Pk "$d" | awk 'NR==2 {print $4}')
if [ -n "$free" ] && [ "$free" -lt $((need + 10240)) ]; then
  echo "influx: $d has ${free} KiB free, the backup needs about ${need} KiB" >&2; exit 28
fi
influxd backup -portable -host 127.0.0.1:8088 -database "$1" "$d" >&2
tar -C "$d" -c .
"""

# InfluxDB 2.x: `influx backup` with the operator token from the container's environment.
INFLUX2_BACKUP = r"""set -e
echo "HEALTHDEPLOY-VERSION $(influxd version 2>/dev/null || influx version)" >&2
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
INFLUX_TOKEN="$DOCKER_INFLUXDB_INIT_ADMIN_TOKEN" influx backup "$d" >&2
tar -C "$d" -c .
"""


def influx_backup(container: str, version: str, database: str) -> Command:
    if version == "1":
        return _in(container, INFLUX1_BACKUP, database, description="influxd backup -portable")
    return _in(container, INFLUX2_BACKUP, description="influx backup")



# MongoDB: one gzip'd archive of every database; the password goes through a 0600 config file.
MONGO_DUMP = r"""set -e
echo "HEALTHDEPLOY-VERSION $(mongod --version 2>/dev/null | head -n 1)" >&2
umask 077
c=$(mktemp)
trap 'rm -f "$c"' EXIT
printf 'password: "%s"\n' "$MONGO_INITDB_ROOT_PASSWORD" > "$c"
exec mongodump --quiet --archive --gzip --config "$c" -u "$MONGO_INITDB_ROOT_USERNAME" --authenticationDatabase admin
"""


def mongo_dump(container: str) -> Command:
    return _in(container, MONGO_DUMP, description="mongodump --archive --gzip")


# Redis (optional extra): the RDB snapshot, fetched by redis-cli over the replication protocol and written
# straight to stdout (`--rdb -`, Redis >= 7: no copy in the container's /tmp); older redis-cli gets a temporary
# file after a free-space check against the dataset's memory size.
REDIS_RDB = r"""set -e
echo "HEALTHDEPLOY-VERSION $(redis-server --version)" >&2
export REDISCLI_AUTH="$REDIS_PASSWORD"
major=$(redis-cli --version | sed 's/^redis-cli \([0-9]*\).*/\1/')
if [ "${major:-0}" -ge 7 ]; then
  exec redis-cli --rdb -
fi
need=$(redis-cli info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'); need=$(( ${need:-0} / 1024 ))
f=$(mktemp)
trap 'rm -f "$f"' EXIT
free=$(df -Pk "$f" | awk 'NR==2 {print $4}')
if [ -n "$free" ] && [ "$free" -lt $((need + 10240)) ]; then
  echo "redis: $(dirname "$f") has ${free} KiB free, the snapshot needs about ${need} KiB" >&2; exit 28
fi
redis-cli --rdb "$f" >&2
cat "$f"
"""


def redis_rdb(container: str) -> Command:
    return _in(container, REDIS_RDB, description="redis-cli --rdb")



# Stderr lines a dump or count reports: every one is kept, however many (see execute/ssh.py StderrKeeper).
STRUCTURED = ("HEALTHDEPLOY-VERSION ", "HEALTHDEPLOY-ROWS ", "HEALTHDEPLOY-T0 ", "HEALTHDEPLOY-INFLUX")


def parse_version(stderr_text: str) -> str:
    return next((line[len(VERSION_LINE):].strip() for line in stderr_text.splitlines()
                 if line.startswith(VERSION_LINE)), "")


def parse_rows(stderr_text: str) -> dict[str, int]:
    rows = {}
    for line in stderr_text.splitlines():
        if line.startswith("HEALTHDEPLOY-ROWS "):
            name, _, count = line[len("HEALTHDEPLOY-ROWS "):].rpartition(" ")
            if count.isdigit():
                rows[name] = int(count)
    return rows


# -- restore (each reads its artifact on stdin) -------------------------------------------------------
# Roles first (an existing role's CREATE fails harmlessly); then the application user's password is
# set back to the current one, so restoring old globals cannot lock the application out.
POSTGRES_RESTORE_GLOBALS = r"""set -e
psql -X -q -U "$POSTGRES_USER" -d postgres 2>&1 >/dev/null | grep -v 'already exists' >&2 || true
# Never an empty password because the container does not know the current one: fail instead.
[ -n "$POSTGRES_PASSWORD" ] || { echo "POSTGRES_PASSWORD is unknown in the container: the role's password was not reset" >&2; exit 1; }
# printf is a shell builtin: the password reaches psql on stdin, never as an argument.
printf "ALTER ROLE \"%s\" PASSWORD '%s';\n" "$POSTGRES_USER" "$POSTGRES_PASSWORD" | psql -X -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres
"""

POSTGRES_RESTORE = r"""exec pg_restore --clean --if-exists --single-transaction --exit-on-error -U "$POSTGRES_USER" -d "${1:-$POSTGRES_DB}" """


def postgres_restore_globals(container: str) -> Command:
    return _in(container, POSTGRES_RESTORE_GLOBALS, description="restore roles", readonly=False)


def postgres_restore(container: str, database: str = "") -> Command:
    return _in(container, POSTGRES_RESTORE, database, description="pg_restore --clean --if-exists", readonly=False)


# `influxd restore` returns while the restored shards are still being opened: a query can answer "shard is
# disabled" for a moment, for one retention policy after another. Ready = two rounds in a row, 0.5 s apart,
# in which a count over EVERY retention policy answers without an error (influx_q retries disabled shards too).
INFLUX1_WAIT_SHARDS = r"""
wait_shards() {
  ok=0; i=0
  while [ "$ok" -lt 2 ]; do
    clean=1
    for rp in $(influx_rps "$1"); do
      out=$(influx_http GET "$1" "SELECT count(*) FROM \"$rp\"./.*/") || clean=0
      case "$out" in *'"error"'*) clean=0 ;; esac
    done
    if [ "$clean" = 1 ]; then ok=$((ok + 1)); else ok=0; fi
    i=$((i + 1))
    [ "$i" -lt 240 ] || { echo "influx: $1: restored shards still not readable after 120 s" >&2; return 1; }
    sleep 0.5
  done
}
"""

# A portable backup restored under another name (``-newdb``), beside whatever else the server holds: the
# drill's throwaway server, or the live server during a restore. If anything fails (or the command is
# killed), the new database is dropped: no temporary database is ever left behind.
# A backup of an empty database has no shard files and `influxd restore` refuses it ("DB metadata not
# changed"): restoring it means an empty database.
INFLUX1_STAGE = INFLUX1_HTTP + INFLUX1_WAIT_SHARDS + r"""set -e
d=$(mktemp -d)
cleanup() {
  rc=$?
  rm -rf "$d"
  if [ "$rc" -ne 0 ]; then influx_http POST "" "DROP DATABASE \"$2\"" >/dev/null 2>&1 || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
tar -x -C "$d"
if ! ls "$d"/*.tar.gz >/dev/null 2>&1; then
  influx_q POST "" "CREATE DATABASE \"$2\"" >/dev/null
  exit 0
fi
influxd restore -portable -host 127.0.0.1:8088 -db "$1" -newdb "$2" "$d" >&2
wait_shards "$2"
"""

# The drill: the set restored into a throwaway server, under its own name (the image's entrypoint may
# create the application's database at start-up, and a portable restore refuses an existing one).
DRILL_DATABASE = "healthdeploy_drill"


def influx_stage(container: str, database: str, new_database: str, description: str = "") -> Command:
    """Stream the portable backup of ``database`` in and restore it as ``new_database`` (dropped on failure)."""
    return _in(container, INFLUX1_STAGE, database, new_database,
               description=description or f"influxd restore -portable as {new_database}",
               readonly=False).tagged("influx-stage", database, new_database)


def influx_drill_restore(container: str, database: str) -> Command:
    return influx_stage(container, database, DRILL_DATABASE, "influxd restore -portable (drill)")


def influx_counts(container: str, database: str, cutoff: str) -> Command:
    return _in(container, INFLUX1_COUNTS + 'influx_counts "$1" "$2"', database, cutoff,
               description="count influx points and series").tagged("influx-counts", database, cutoff)


def influx_ready(container: str) -> Command:
    return _in(container, "curl -fsS -o /dev/null http://127.0.0.1:8086/ping", description="wait for InfluxDB")


def _influx_json(line: str) -> list:
    from deploy.core.errors import IntegrityError

    try:
        return json.loads(line).get("results", [])
    except ValueError:
        raise IntegrityError(f"InfluxDB answered a count query with something that is not JSON: {line[:120]!r}",
                             "run it again; see the InfluxDB container's logs") from None


def _point_counts(results: list) -> dict[str, dict[str, int]]:
    points = {}
    for result in results:
        for row in result.get("series", []):
            columns, values = row.get("columns", []), (row.get("values") or [[]])[0]
            if columns != ["count"]:
                points[row["name"]] = {c[len("count_"):]: int(v) for c, v in zip(columns, values)
                                       if c.startswith("count_") and v is not None}
    return points


def parse_retention_policies(results: list) -> list[dict]:
    """SHOW RETENTION POLICIES -> [{name, duration, shard_duration, replication, default}]."""
    rps = []
    for result in results:
        for row in result.get("series", []):
            columns = row.get("columns", [])
            for values in row.get("values") or []:
                item = dict(zip(columns, values))
                rps.append({"name": item.get("name"), "duration": item.get("duration", "0s"),
                            "shard_duration": item.get("shardGroupDuration", "168h0m0s"),
                            "replication": int(item.get("replicaN", 1) or 1), "default": bool(item.get("default"))})
    return rps


def parse_continuous_queries(results: list, database: str | None = None) -> list[dict]:
    """SHOW CONTINUOUS QUERIES -> [{database, name, query}] (of ``database`` only, when given)."""
    cqs = []
    for result in results:
        for row in result.get("series", []):
            if database is not None and row.get("name") != database:
                continue
            columns = row.get("columns", [])
            for values in row.get("values") or []:
                item = dict(zip(columns, values))
                cqs.append({"database": row.get("name"), "name": item.get("name"), "query": item.get("query")})
    return cqs


def parse_influx_counts(stderr_text: str, database: str | None = None) -> dict:
    """The structured lines of influx_counts -> {"t0", "points": {measurement: {field: n}} (default retention
    policy), "rp_points": {rp: {measurement: {field: n}}} (the others), "series": {measurement: n},
    "retention_policies": [...], "continuous_queries": [...]}.

    Sets made before retention policies were counted have only HEALTHDEPLOY-INFLUX lines (default policy)."""
    points: dict[str, dict[str, int]] = {}
    per_rp: dict[str, dict[str, dict[str, int]]] = {}
    series: dict[str, int] = {}
    rps: list[dict] = []
    cqs: list[dict] | None = None
    t0 = None
    for line in stderr_text.splitlines():
        if line.startswith("HEALTHDEPLOY-T0 "):
            t0 = line.split(" ", 1)[1].strip()
        elif line.startswith("HEALTHDEPLOY-INFLUX-RPS "):
            rps = parse_retention_policies(_influx_json(line.split(" ", 1)[1]))
        elif line.startswith("HEALTHDEPLOY-INFLUX-CQS "):
            cqs = parse_continuous_queries(_influx_json(line.split(" ", 1)[1]), database)
        elif line.startswith("HEALTHDEPLOY-INFLUX-RP "):
            _, rp, body = line.split(" ", 2)
            per_rp[rp] = _point_counts(_influx_json(body))
        elif line.startswith("HEALTHDEPLOY-INFLUX "):
            results = _influx_json(line.split(" ", 1)[1])
            for result in results:
                for row in result.get("series", []):
                    columns, values = row.get("columns", []), (row.get("values") or [[]])[0]
                    if columns == ["count"]:
                        series[row["name"]] = int(values[0])
            points.update(_point_counts(results))  # the old format: counts of the default policy
    default = next((rp["name"] for rp in rps if rp["default"]), None)
    if default in per_rp:
        points = per_rp.pop(default)
    out = {"t0": t0, "points": points, "series": series}
    if rps:
        out["retention_policies"] = rps
        out["rp_points"] = {rp: counts for rp, counts in sorted(per_rp.items()) if counts}
    if cqs is not None:
        out["continuous_queries"] = cqs
    return out


INFLUX1_POINTS = INFLUX1_CURL + r"""icurl -fsS -G http://127.0.0.1:8086/query --data-urlencode "db=$1" --data-urlencode 'q=SELECT count(*) FROM /.*/'"""


# InfluxDB 2.x will not restore into an existing bucket: restore into a new one, and only when that
# worked, delete the live bucket and give the new one its name (the application writes by bucket name).
INFLUX2_RESTORE = r"""set -e
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
tar -x -C "$d"
export INFLUX_TOKEN="$DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"
org="$DOCKER_INFLUXDB_INIT_ORG"
tmp="$1-restore-$(date +%s)"
influx restore "$d" --org "$org" --bucket "$1" --new-bucket "$tmp" >&2
new_id=$(influx bucket list --org "$org" --name "$tmp" --hide-headers | awk '{print $1}')
[ -n "$new_id" ] || { echo "influx: the restored bucket $tmp is missing" >&2; exit 1; }
if influx bucket list --org "$org" --name "$1" --hide-headers >/dev/null 2>&1; then
  influx bucket delete --org "$org" --name "$1" >&2
fi
influx bucket update --id "$new_id" --name "$1" >&2
"""


def influx_restore(container: str, version: str, database: str) -> Command:
    """InfluxDB 2.x only (builder, unit-tested): 1.x restores beside the live data (commands/restore.py)."""
    if version == "1":
        raise ValueError("InfluxDB 1.x restores beside the live database: see deploy/commands/restore.py")
    return _in(container, INFLUX2_RESTORE, database, description="influx restore (into a new bucket, then swapped)",
               readonly=False)


def influx_points(container: str, database: str) -> Command:
    return _in(container, INFLUX1_POINTS, database, description="count influx points")


MONGO_RESTORE = r"""set -e
umask 077
c=$(mktemp)
trap 'rm -f "$c"' EXIT
printf 'password: "%s"\n' "$MONGO_INITDB_ROOT_PASSWORD" > "$c"
exec mongorestore --quiet --archive --gzip --drop --config "$c" -u "$MONGO_INITDB_ROOT_USERNAME" --authenticationDatabase admin
"""


def mongo_restore(container: str) -> Command:
    return _in(container, MONGO_RESTORE, description="mongorestore --drop", readonly=False)


# MongoDB beside the live data (builders only: no MongoDB server runs here). The application's database is
# restored under another name (--nsFrom/--nsTo), then the collections are renamed in two passes: live ->
# previous, restored -> live (renameCollection, admin); undone by the same swap the other way. mongosh reads
# the password from the container's environment in JavaScript, never from argv.
MONGO_STAGE = r"""set -e
umask 077
c=$(mktemp)
trap 'rm -f "$c"' EXIT
printf 'password: "%s"\n' "$MONGO_INITDB_ROOT_PASSWORD" > "$c"
exec mongorestore --quiet --archive --gzip --drop --config "$c" -u "$MONGO_INITDB_ROOT_USERNAME" \
  --authenticationDatabase admin --nsInclude "$1.*" --nsFrom "$1.*" --nsTo "$2.*"
"""

MONGO_JS_AUTH = ('const a = db.getSiblingDB("admin"); '
                 'a.auth(process.env.MONGO_INITDB_ROOT_USERNAME, process.env.MONGO_INITDB_ROOT_PASSWORD); '
                 'const names = (d) => a.getSiblingDB(d).getCollectionNames().filter((n) => !n.startsWith("system.")); ')

MONGO_SWAP_JS = MONGO_JS_AUTH + (
    'const live = process.env.HD_LIVE, old = process.env.HD_OLD, fresh = process.env.HD_NEW; '
    'if (names(fresh).length === 0 && names(old).length > 0) { print("switched"); quit(0); } '
    'for (const n of names(live)) { const r = a.adminCommand({renameCollection: live + "." + n, to: old + "." + n, dropTarget: true}); if (!r.ok) { throw new Error(JSON.stringify(r)); } } '
    'for (const n of names(fresh)) { const r = a.adminCommand({renameCollection: fresh + "." + n, to: live + "." + n}); if (!r.ok) { throw new Error(JSON.stringify(r)); } } '
    'print("switched");')

MONGO_DROP_JS = MONGO_JS_AUTH + 'a.getSiblingDB(process.env.HD_DB).dropDatabase();'

MONGO_SH = r"""exec env HD_LIVE="$1" HD_OLD="$2" HD_NEW="$3" HD_DB="$1" mongosh --quiet --norc mongodb://127.0.0.1:27017/admin --eval "$4" """


def mongo_stage(container: str, database: str, new_database: str) -> Command:
    return _in(container, MONGO_STAGE, database, new_database, description=f"mongorestore as {new_database}",
               readonly=False).tagged("mongo-stage", database, new_database)


def mongo_swap(container: str, live: str, old: str, new: str) -> Command:
    """``live``'s collections move to ``old``, ``new``'s to ``live`` (idempotent)."""
    return _in(container, MONGO_SH, live, old, new, MONGO_SWAP_JS, description=f"switch MongoDB database {live}",
               readonly=False).tagged("mongo-swap", live, old, new)


def mongo_drop_database(container: str, database: str) -> Command:
    return _in(container, MONGO_SH, database, "", "", MONGO_DROP_JS, description=f"drop MongoDB database {database}",
               readonly=False).tagged("mongo-drop", database)
