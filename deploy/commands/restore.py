"""Restore command builders: each store is loaded BESIDE its live data, checked, then switched in one short step.

- PostgreSQL: ``pg_restore`` into a new database; the switch renames the live database away and the new one
  into its name in ONE transaction (connections to both terminated first, retried while one comes back);
  undone by renaming back.
- InfluxDB 1.x (no rename): the set is restored as a new database (``influxd restore -newdb``); the live
  database is copied to a "previous" database; the switch recreates the live database with every retention
  policy and continuous query of the set and copies the new data in BOUNDED batches (one statement per
  retention policy, measurement and time range, never one unbounded ``SELECT * INTO``); undone the same way
  from the "previous" copy. Statements travel on stdin (data, never shell text).
- The guard: a process on the host, held like the lock, that runs the restore's undo script when our
  connection ends while the restore is armed (our process killed, the connection dropped).

Credentials come from the container's environment; nothing secret is on a command line.
"""

from __future__ import annotations

import datetime as _dt
import json
import re

from .backup import INFLUX1_HTTP, _in
from .base import Command, script
from .presence import LEASE_S, OPERATOR_WAIT_FUNCTION, with_heartbeat

# -- PostgreSQL --------------------------------------------------------------------------------------
# The names go in as psql variables (:'name' / :"name" are quoted by psql), never pasted into SQL text.
PG_CREATE = r"""set -e
printf '%s\n' 'CREATE DATABASE :"db";' | psql -X -q -v ON_ERROR_STOP=1 -v db="$1" -U "$POSTGRES_USER" -d postgres
"""

PG_LOAD = r"""exec pg_restore --single-transaction --exit-on-error -U "$POSTGRES_USER" -d "$1" """

# Drop a database we made (staging or the old live copy): WITH (FORCE) ends its sessions (PostgreSQL 13+).
PG_DROP = r"""set -e
for db in "$@"; do
  printf '%s\n' 'DROP DATABASE IF EXISTS :"db" WITH (FORCE);' \
    | psql -X -q -v ON_ERROR_STOP=1 -v db="$db" -U "$POSTGRES_USER" -d postgres 2>/dev/null \
  || printf '%s\n' 'DROP DATABASE IF EXISTS :"db";' | psql -X -q -v ON_ERROR_STOP=1 -v db="$db" -U "$POSTGRES_USER" -d postgres
done
"""

# Rename FROM -> TO and NEW -> FROM in one transaction, after ending every session on both (a writer that was
# stopped cannot come back; a stray one is ended again on the next try). Idempotent: a switch already done
# (TO exists, NEW does not) answers "switched".
PG_SWAP = r"""set -e
live=$1; old=$2; new=$3
i=0
while :; do
  out=$(psql -X -q -t -A -v ON_ERROR_STOP=1 -v live="$live" -v old="$old" -v new="$new" -U "$POSTGRES_USER" -d postgres 2>&1 <<'SQL'
SELECT set_config('hd.live', :'live', false), set_config('hd.old', :'old', false), set_config('hd.new', :'new', false);
DO $$
DECLARE live text := current_setting('hd.live'); old text := current_setting('hd.old'); new text := current_setting('hd.new');
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = new) THEN
    IF EXISTS (SELECT 1 FROM pg_database WHERE datname = old) AND EXISTS (SELECT 1 FROM pg_database WHERE datname = live) THEN
      RAISE NOTICE 'HEALTHDEPLOY-SWAP already';
      RETURN;
    END IF;
    RAISE EXCEPTION 'database % does not exist', new;
  END IF;
  PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname IN (live, new) AND pid <> pg_backend_pid();
  IF EXISTS (SELECT 1 FROM pg_database WHERE datname = live) THEN
    EXECUTE format('ALTER DATABASE %I RENAME TO %I', live, old);
  END IF;
  EXECUTE format('ALTER DATABASE %I RENAME TO %I', new, live);
END $$;
SQL
) && { echo "switched"; exit 0; }
  case "$out" in
    *'being accessed by other users'*) ;;
    *) printf '%s\n' "$out" >&2; exit 1 ;;
  esac
  i=$((i + 1))
  [ "$i" -lt 40 ] || { echo "postgres: $live is still in use after 20 s" >&2; exit 1; }
  sleep 0.5
done
"""


def postgres_create_database(container: str, database: str) -> Command:
    return _in(container, PG_CREATE, database, description=f"create database {database}",
               readonly=False).tagged("pg-create", database)


def postgres_load(container: str, database: str) -> Command:
    """pg_restore of the custom-format dump on stdin into ``database`` (new and empty), one transaction."""
    return _in(container, PG_LOAD, database, description=f"pg_restore into {database}",
               readonly=False).tagged("pg-load", database)


def postgres_drop_databases(container: str, *databases: str) -> Command:
    return _in(container, PG_DROP, *databases, description=f"drop database(s) {', '.join(databases)}",
               readonly=False).tagged("pg-drop", *databases)


def postgres_switch(container: str, live: str, old: str, new: str) -> Command:
    """The switch: ``live`` becomes ``old`` and ``new`` becomes ``live``, in one transaction."""
    return _in(container, PG_SWAP, live, old, new, description=f"switch database {live} to the restored one",
               readonly=False).tagged("pg-switch", live, old, new)


def postgres_unswitch(container: str, live: str, old: str, new: str) -> Command:
    """The undo of the switch: the restored ``live`` goes back to ``new``, ``old`` becomes ``live`` again."""
    return _in(container, PG_SWAP, live, new, old, description=f"switch database {live} back to the previous one",
               readonly=False).tagged("pg-unswitch", live, old, new)


PG_DATABASES = r"""psql -X -q -t -A -U "$POSTGRES_USER" -d postgres -c 'SELECT datname FROM pg_database ORDER BY 1'"""


def postgres_databases(container: str) -> Command:
    return _in(container, PG_DATABASES, description="list databases").tagged("pg-databases")


def parse_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- InfluxDB 1.x ------------------------------------------------------------------------------------
INFLUX1_QUERY = INFLUX1_HTTP + r"""influx_q GET "$1" "$2" """

# Statements on stdin, one a line: DATABASE<TAB>STATEMENT ("-": no database). Each is POSTed
# and must answer without an error; "HEALTHDEPLOY-STEP n" after each, for progress and for the tests.
INFLUX1_EXEC = INFLUX1_HTTP + r"""set -e
n=0
while IFS='	' read -r db stmt; do
  [ -n "$stmt" ] || continue
  [ "$db" = - ] && db=
  influx_q POST "$db" "$stmt" >/dev/null
  n=$((n + 1))
  echo "HEALTHDEPLOY-STEP $n" >&2
done
"""


def influx_query(container: str, database: str, query: str) -> Command:
    """A read-only InfluxQL query (SHOW ...): its JSON answer on stdout."""
    return _in(container, INFLUX1_QUERY, database, query, description="query InfluxDB").tagged(
        "influx-query", database, query)


def influx_exec(container: str, statements: list[tuple[str, str]], description: str) -> Command:
    """Run (database, statement) pairs in order; the first error stops it. One round trip for all of them."""
    for database, statement in statements:
        if "\n" in statement or "\t" in database or "\n" in database:
            raise ValueError(f"an InfluxQL statement must be one line: {statement!r}")
    body = "".join(f"{db or '-'}\t{statement}\n" for db, statement in statements).encode()
    command = _in(container, INFLUX1_EXEC, description=description, readonly=False)
    return command.with_stdin(body).tagged("influx-exec", description, tuple(statements))


def ident(name: str) -> str:
    """An InfluxQL identifier, double-quoted."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _go_duration_seconds(text: str) -> int:
    """Go's duration text (168h0m0s, 0s, 1h30m) -> seconds."""
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h|d|w)", text or "0s"):
        total += float(number) * {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600,
                                  "d": 86400, "w": 604800}[unit]
    return int(total)


def _duration(text: str) -> str:
    seconds = _go_duration_seconds(text)
    return "INF" if seconds == 0 else f"{seconds}s"


def recreate_statements(database: str, rps: list[dict]) -> list[tuple[str, str]]:
    """DROP and CREATE ``database`` with exactly these retention policies (the default one kept default)."""
    out = [("", f"DROP DATABASE {ident(database)}"), ("", f"CREATE DATABASE {ident(database)}")]
    names = {rp["name"] for rp in rps}
    for rp in rps:
        verb = "ALTER" if rp["name"] == "autogen" else "CREATE"
        out.append(("", f"{verb} RETENTION POLICY {ident(rp['name'])} ON {ident(database)} DURATION "
                        f"{_duration(rp['duration'])} REPLICATION {int(rp['replication'])} SHARD DURATION "
                        f"{max(_go_duration_seconds(rp['shard_duration']), 3600)}s" + (" DEFAULT" if rp["default"] else "")))
    if rps and "autogen" not in names:
        out.append(("", f"DROP RETENTION POLICY {ident('autogen')} ON {ident(database)}"))
    return out


def cq_statements(database: str, cqs: list[dict]) -> list[tuple[str, str]]:
    """The continuous queries again, from their recorded text (created after the copy: they must not run on a
    half-copied database)."""
    return [("", _retarget_cq(cq["query"], cq.get("database"), database)) for cq in cqs]


def _retarget_cq(query: str, origin: str | None, database: str) -> str:
    """A continuous query keeps its text; only its ``ON <db>`` is pointed at ``database`` (the live name)."""
    query = " ".join(query.split())
    if origin and origin != database:
        query = re.sub(r"\bON\s+(\"[^\"]+\"|\S+)", f"ON {ident(database)}", query, count=1)
    return query


COPY_HOURS = 24  # one statement never copies more than a day of one measurement of one retention policy


def _parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _rfc3339(value: _dt.datetime) -> str:
    return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_shard_groups(results: list, database: str) -> dict[str, list[tuple[str, str]]]:
    """SHOW SHARDS -> {retention policy: [(start, end), ...]} of ``database``, sorted, de-duplicated."""
    groups: dict[str, set[tuple[str, str]]] = {}
    for result in results:
        for row in result.get("series", []):
            if row.get("name") != database:
                continue
            columns = row.get("columns", [])
            for values in row.get("values") or []:
                item = dict(zip(columns, values))
                groups.setdefault(item["retention_policy"], set()).add((item["start_time"], item["end_time"]))
    return {rp: sorted(ranges) for rp, ranges in sorted(groups.items())}


def parse_measurements(results: list) -> list[str]:
    names = []
    for result in results:
        for row in result.get("series", []):
            names += [values[0] for values in row.get("values") or []]
    return sorted(set(names))


def copy_statements(source: str, target: str, measurements: list[str],
                    shard_groups: dict[str, list[tuple[str, str]]], hours: int = COPY_HOURS) -> list[tuple[str, str]]:
    """Bounded copies of every measurement of every retention policy: one statement per measurement and time
    range of at most ``hours`` within each shard group (tags kept by GROUP BY *)."""
    out = []
    step = _dt.timedelta(hours=hours)
    for rp, ranges in shard_groups.items():
        for start_text, end_text in ranges:
            start, end = _parse_time(start_text), _parse_time(end_text)
            while start < end:
                stop = min(start + step, end)
                for measurement in measurements:
                    out.append((source, f"SELECT * INTO {ident(target)}.{ident(rp)}.{ident(measurement)} FROM "
                                        f"{ident(source)}.{ident(rp)}.{ident(measurement)} WHERE time >= "
                                        f"'{_rfc3339(start)}' AND time < '{_rfc3339(stop)}' GROUP BY *"))
                start = stop
    return out


def influx_results(text: str) -> list:
    return json.loads(text or "{}").get("results", [])


# -- the guard ---------------------------------------------------------------------------------------
# Held like the lock: "acquired", then it waits while we are there (commands.presence; $2 is the lease). When
# we are gone while the restore is armed ($1/armed exists: our process died, the connection dropped, or we
# were cut off or frozen for the lease), the undo script runs on the host,
# detached from the SSH session, its output in $1/recovery.log. A restore that ends (done or undone) disarms
# it first, so a normal close does nothing.
GUARD = OPERATOR_WAIT_FUNCTION + r"""j=$1
mkdir -p "$j"
echo acquired
operator_wait "$2"
if [ -f "$j/armed" ]; then
  trap '' HUP INT TERM PIPE
  sleep 3  # a statement still in flight when the connection dropped ends first
  {
    echo "connection lost at $(date -u +%Y-%m-%dT%H:%M:%SZ): running the undo script"
    if sh "$j/undo.sh"; then echo "HEALTHDEPLOY-RECOVERED"; else echo "HEALTHDEPLOY-RECOVERY-FAILED"; fi
    rm -f "$j/armed"
  } >>"$j/recovery.log" 2>&1 </dev/null
fi
"""


def guard_hold(journal_dir: str, lease_s: int = LEASE_S) -> Command:
    return with_heartbeat(script(GUARD, journal_dir, str(lease_s), description="arm the restore guard",
                                 intent=("guard-hold", journal_dir)))


def undo_script(entries: list[Command], journal_dir: str) -> tuple[bytes, dict[str, bytes]]:
    """The guard's undo script: ``entries`` newest first, each run whatever the others did; the stdin of a
    command goes into its own file beside the script. Returns (script, {file name: content})."""
    lines = ["# written by healthdeploy restore: undo, newest first", "rc=0"]
    inputs: dict[str, bytes] = {}
    for index, command in enumerate(reversed(entries)):
        line = command.render()
        if command.stdin is not None:
            name = f"undo-{index}.in"
            inputs[name] = command.stdin
            line += f" < {journal_dir}/{name}"
        lines.append(f"echo {_sh_quote('undo: ' + command.description)}")
        lines.append(f"{line} || rc=1")
    lines.append("exit $rc")
    return ("\n".join(lines) + "\n").encode(), inputs


def _sh_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


JOURNAL_STATE = r"""for d in "$1"/*/; do
  [ -d "$d" ] || continue
  printf '=== %s\n' "$(basename "$d")"
  [ -f "$d/armed" ] && echo armed
  [ -f "$d/plan.json" ] && printf 'plan %s\n' "$(tr -d '\n' < "$d/plan.json")"
  [ -f "$d/recovery.log" ] && sed 's/^/log /' "$d/recovery.log"
done
exit 0
"""


def journal_state(journals_dir: str) -> Command:
    """Every restore journal left on the host (a restore that did not end: armed, its plan, what the guard did)."""
    return script(JOURNAL_STATE, journals_dir, description="read restore journals", readonly=True,
                  intent=("journals", journals_dir))


def parse_journals(text: str) -> dict[str, dict]:
    journals: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("=== "):
            current = journals.setdefault(line[4:].strip(), {"armed": False, "plan": {}, "log": []})
        elif current is None:
            continue
        elif line == "armed":
            current["armed"] = True
        elif line.startswith("plan "):
            try:
                current["plan"] = json.loads(line[5:])
            except ValueError:
                current["plan"] = {}
        elif line.startswith("log "):
            current["log"].append(line[4:])
    return journals


RUN_UNDO = r"""j=$1
[ -f "$j/undo.sh" ] || exit 0
if sh "$j/undo.sh"; then echo HEALTHDEPLOY-RECOVERED; rm -f "$j/armed"; else exit 1; fi
"""


def run_undo(journal_dir: str) -> Command:
    """Run a journal's undo script now (its guard never ran it: e.g. the host rebooted)."""
    return script(RUN_UNDO, journal_dir, description="run the undo script of an unfinished restore",
                  intent=("run-undo", journal_dir))


# In the lock's undo journal (commands/journal.py): when our process vanishes, the lock's holder runs this
# before it releases the lock, so the lock stays held until the guard's undo finished (no deploy can start in
# the middle of it); a failed undo fails the entry, and the lock stays, stale, for an operator to see.
WAIT_GUARD = r"""j=$1; i=0
while [ -f "$j/armed" ]; do
  i=$((i + 1)); [ "$i" -lt 3600 ] || { echo "the restore guard did not finish within 30 min" >&2; exit 1; }
  sleep 0.5
done
if grep -q HEALTHDEPLOY-RECOVERY-FAILED "$j/recovery.log" 2>/dev/null; then
  echo "the restore guard's undo failed: see $j/recovery.log" >&2; exit 1
fi
exit 0
"""


def wait_for_guard(journal_dir: str) -> Command:
    return script(WAIT_GUARD, journal_dir, description="wait for the restore guard's undo",
                  intent=("wait-guard", journal_dir))
