"""Backup command builders: each engine's own consistent logical dump, run inside its container,
writing the artifact to stdout (the executor streams and checksums it). Credentials are read from the
container's own environment inside the container, never put on a command line."""

from __future__ import annotations

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
               description="count rows per table")


def postgres_globals(container: str) -> Command:
    return _in(container, 'echo "HEALTHDEPLOY-VERSION $(pg_dumpall --version)" >&2; '
                          'exec pg_dumpall --globals-only -U "$POSTGRES_USER"', description="pg_dumpall --globals-only")



# InfluxDB 1.x: a portable backup of the database into a temporary directory, streamed as a tar.
# Before the backup, the points per measurement and field up to a cut-off time T0 and the series per
# measurement are recorded (stderr): everything up to T0 is in the backup, so a drill can compare.
INFLUX1_COUNTS = r"""
influx_counts() {
  for q in "SELECT count(*) FROM /.*/ WHERE time <= '$2'" "SHOW SERIES EXACT CARDINALITY"; do
    out=$(curl -fsS -G http://127.0.0.1:8086/query --data-urlencode "db=$1" --data-urlencode "q=$q") || {
      echo "influx: $q: the query failed" >&2; return 1; }
    case "$out" in *'"error"'*) echo "influx: $q: $out" >&2; return 1 ;; esac
    echo "HEALTHDEPLOY-INFLUX $(printf '%s' "$out" | tr -d '\n')" >&2
  done
}
"""

INFLUX1_BACKUP = INFLUX1_COUNTS + r"""set -e
echo "HEALTHDEPLOY-VERSION $(influxd version 2>/dev/null)" >&2
t0=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "HEALTHDEPLOY-T0 $t0" >&2
influx_counts "$1" "$t0"
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
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


# Redis (optional extra): the RDB snapshot, fetched by redis-cli over the replication protocol.
REDIS_RDB = r"""set -e
echo "HEALTHDEPLOY-VERSION $(redis-server --version)" >&2
f=$(mktemp)
trap 'rm -f "$f"' EXIT
REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --rdb "$f" >&2
cat "$f"
"""


def redis_rdb(container: str) -> Command:
    return _in(container, REDIS_RDB, description="redis-cli --rdb")



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


# `influxd restore` returns while the restored shards are still disabled for a moment.
INFLUX1_WAIT_SHARDS = r"""
wait_shards() {
  i=0
  while :; do
    out=$(curl -sS -G http://127.0.0.1:8086/query --data-urlencode "db=$1" --data-urlencode "q=SELECT count(*) FROM /.*/")
    case "$out" in *'shard is disabled'*) ;; *) return 0 ;; esac
    i=$((i + 1))
    [ "$i" -lt 120 ] || { echo "influx: $1: shards still disabled after 60 s" >&2; return 1; }
    sleep 0.5
  done
}
"""

# InfluxDB 1.x cannot restore over an existing database: restore into a temporary one, recreate the
# target empty, copy every measurement across (SELECT ... INTO, tags kept by GROUP BY *), drop the temporary.
INFLUX1_RESTORE = INFLUX1_WAIT_SHARDS + r"""set -e
d=$(mktemp -d)
tmpdb="healthdeploy_restore_$(date +%s)"
trap 'rm -rf "$d"' EXIT
# InfluxDB answers HTTP 200 with {"error": ...} for a failed statement: read the body, not the status.
q() {
  out=$(curl -sS -XPOST http://127.0.0.1:8086/query ${2:+--data-urlencode "db=$2"} --data-urlencode "q=$1") || return 1
  case "$out" in *'"error"'*) echo "influx: $1: $out" >&2; return 1 ;; esac
}
tar -x -C "$d"
# A backup of an empty database has no shard files, and `influxd restore` refuses it ("DB metadata not
# changed"): restoring it means an empty database.
if ! ls "$d"/*.tar.gz >/dev/null 2>&1; then
  q "DROP DATABASE \"$1\""
  q "CREATE DATABASE \"$1\""
  exit 0
fi
influxd restore -portable -host 127.0.0.1:8088 -db "$1" -newdb "$tmpdb" "$d" >&2
wait_shards "$tmpdb"
q "SHOW MEASUREMENTS" "$tmpdb"
q "DROP DATABASE \"$1\""
q "CREATE DATABASE \"$1\""
if ! q "SELECT * INTO \"$1\"..:MEASUREMENT FROM /.*/ GROUP BY *" "$tmpdb"; then
  echo "the restored data is kept in database $tmpdb; copy it by hand" >&2
  exit 1
fi
q "DROP DATABASE \"$tmpdb\""
"""

# The drill: the set restored into a throwaway server, under its own name (the image's entrypoint may
# create the application's database at start-up, and a portable restore refuses an existing one).
DRILL_DATABASE = "healthdeploy_drill"
INFLUX1_DRILL_RESTORE = INFLUX1_WAIT_SHARDS + r"""set -e
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
tar -x -C "$d"
if ! ls "$d"/*.tar.gz >/dev/null 2>&1; then  # an empty database: nothing for influxd restore to do
  curl -fsS -o /dev/null -XPOST http://127.0.0.1:8086/query --data-urlencode "q=CREATE DATABASE \"$2\""
  exit 0
fi
influxd restore -portable -host 127.0.0.1:8088 -db "$1" -newdb "$2" "$d" >&2
wait_shards "$2"
"""


def influx_drill_restore(container: str, database: str) -> Command:
    return _in(container, INFLUX1_DRILL_RESTORE, database, DRILL_DATABASE,
               description="influxd restore -portable (drill)", readonly=False)


def influx_counts(container: str, database: str, cutoff: str) -> Command:
    return _in(container, INFLUX1_COUNTS + 'influx_counts "$1" "$2"', database, cutoff,
               description="count influx points and series")


def influx_ready(container: str) -> Command:
    return _in(container, "curl -fsS -o /dev/null http://127.0.0.1:8086/ping", description="wait for InfluxDB")


def parse_influx_counts(stderr_text: str) -> dict:
    """``HEALTHDEPLOY-INFLUX`` lines -> {"t0", "points": {measurement: {field: n}}, "series": {measurement: n}}."""
    import json

    from deploy.core.errors import IntegrityError

    points: dict[str, dict[str, int]] = {}
    series: dict[str, int] = {}
    t0 = None
    for line in stderr_text.splitlines():
        if line.startswith("HEALTHDEPLOY-T0 "):
            t0 = line.split(" ", 1)[1].strip()
        if not line.startswith("HEALTHDEPLOY-INFLUX "):
            continue
        try:
            results = json.loads(line.split(" ", 1)[1]).get("results", [])
        except ValueError:
            raise IntegrityError(f"InfluxDB answered a count query with something that is not JSON: {line[:120]!r}",
                                 "run it again; see the InfluxDB container's logs") from None
        for result in results:
            for row in result.get("series", []):
                columns, values = row.get("columns", []), (row.get("values") or [[]])[0]
                if columns == ["count"]:
                    series[row["name"]] = int(values[0])
                else:
                    points[row["name"]] = {c[len("count_"):]: int(v) for c, v in zip(columns, values)
                                           if c.startswith("count_") and v is not None}
    return {"t0": t0, "points": points, "series": series}


INFLUX1_POINTS = r"""curl -fsS -G http://127.0.0.1:8086/query --data-urlencode "db=$1" --data-urlencode 'q=SELECT count(*) FROM /.*/'"""


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
    if version != "1":
        return _in(container, INFLUX2_RESTORE, database, description="influx restore (into a new bucket, then swapped)",
                   readonly=False)
    return _in(container, INFLUX1_RESTORE, database, description="influxd restore -portable", readonly=False)


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
