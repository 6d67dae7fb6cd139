"""`inv restore`: every store is loaded BESIDE its live data and checked against the manifest; only when all
are, every store is switched in one short step; the writers come back; only then are the previous copies
dropped. Anything failing (an error, an interrupt, a lost connection) undoes what was done, newest first:
the live data is as it was and the writers come back on it.

The caller holds the host lock on the data host and every application host whose writers stop. The plan
(plan/restore.py) says what happens; this module runs it:

1. the writers (backend, ai-service) stop on every application host;
2. a safety backup of the same stores (kind=safety), checksummed, then drilled; a failed drill stops here;
3. each store is loaded beside the live data (a new database, a staging bucket) and checked;
4. every store is switched (PostgreSQL: a rename in one transaction; InfluxDB 1.x: recreated with every
   retention policy and continuous query and filled in bounded batches from the new database, the live
   data kept in a "previous" database; MinIO: server-side copies from the staging buckets, the live objects
   kept in "previous" buckets), each checked again;
5. the writers start, the gateway is pointed at their (possibly new) addresses, they must be healthy;
6. the previous copies and the staging are dropped.

Every undo is registered before its action. A guard process on each touched host (commands/restore.py GUARD)
runs the shell half of the undo (writers started again, databases renamed back or recreated from the
previous copy, staging dropped) if our process dies or the connection drops; what only this process can undo
(object copies through the S3 API) is done by the next `inv restore` from the journal the guard leaves.

TARGET=swarm runs the same restore (``SwarmRestore``) on the data node's task containers: the writers are
scaled to 0 and back through the manager instead of stopped, and no gateway step follows (Swarm's DNS does).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deploy.commands import backup as bk
from deploy.commands import docker as dk
from deploy.commands import files as fs
from deploy.commands import restore as rs
from deploy.core.console import Console
from deploy.core.errors import ExitCode, HealthdeployError, IntegrityError
from deploy.core.services import WRITERS
from deploy.core.settings import Settings
from deploy.execute.executor import ConnectionLost, shielded
from deploy.execute.health_now import HealthNow
from deploy.plan.restore import RestorePlan

RESTORED, UNCHANGED, FAILED = "restored", "unchanged", "failed"


def checkpoint(console: Console, alias: str, name: str) -> None:
    """A named point of the restore. With HEALTHDEPLOY_RESTORE_PAUSE=NAME:SECONDS it waits there (the fault
    injection tests kill the process or the connection at each point); otherwise it only says where it is."""
    console.phase(alias, f"checkpoint {name}")
    wanted = os.environ.get("HEALTHDEPLOY_RESTORE_PAUSE", "")
    point, _, seconds = wanted.partition(":")
    if point == name:
        print(f"HEALTHDEPLOY-CHECKPOINT {name}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 30))


class RestoreFailed(HealthdeployError):
    """The restore did not happen; ``states`` says what each store is now (unchanged unless an undo failed)."""

    def __init__(self, cause: BaseException, states: dict[str, str], undo: list[tuple[str, str]]):
        message = getattr(cause, "message", None) or str(cause) or type(cause).__name__
        if isinstance(cause, KeyboardInterrupt):
            message = "interrupted"
        self.cause_message = message
        summary = ", ".join(f"{s}: {state}" for s, state in states.items())
        if all(state == UNCHANGED for state in states.values()):
            tail = f"every store is as it was ({summary}); the writers are running on it"
        else:
            tail = f"NOT every store could be put back ({summary})"
        super().__init__(f"restore failed: {message}; {tail}",
                         getattr(cause, "hint", None) or "fix the cause and run the restore again")
        self.cause, self.states, self.undo = cause, states, undo
        self.exit_code = ExitCode.INTERRUPTED if isinstance(cause, KeyboardInterrupt) else getattr(
            cause, "exit_code", ExitCode.FAILED)


class Guard:
    """The host side of the undo: a held process that runs ``undo.sh`` if our connection ends while armed."""

    def __init__(self, session, journal_dir: str):
        self.session, self.dir = session, journal_dir
        self.entries: list = []
        self.held = None

    def arm(self, record: dict) -> None:
        s = self.session
        s.run(fs.mkdirs(self.dir, mode="0700"))
        self.write_plan(record)
        self._write_undo()
        s.run(fs.write_file(f"{self.dir}/armed", b"armed\n", "0600"))
        self.held = s.host.hold(rs.guard_hold(self.dir))
        if self.held.first_line != "acquired":
            raise HealthdeployError(f"{s.alias}: the restore guard did not start ({self.held.first_line})",
                                    "check the host's shell and disk")

    def write_plan(self, record: dict) -> None:
        self.session.run(fs.write_file(f"{self.dir}/plan.json", json.dumps(record, sort_keys=True).encode(), "0600"))

    def push(self, command) -> None:
        self.entries.append(command)
        self._write_undo()

    def _write_undo(self) -> None:
        script, inputs = rs.undo_script(self.entries, self.dir)
        for name, data in inputs.items():
            self.session.run(fs.write_file(f"{self.dir}/{name}", data, "0600"))
        self.session.run(fs.write_file(f"{self.dir}/undo.sh", script, "0600"))

    def disarm(self, remove: bool = True) -> None:
        """The restore ended (done, or undone here): the guard must do nothing; the journal goes."""
        with shielded():
            try:
                self.session.run(fs.remove_paths(self.dir, ("armed",)))
                self.session.undo.discard()  # the lock's journal entry waiting for the guard
                if remove:
                    self.session.run(fs.remove_tree(self.dir))
            finally:
                if self.held is not None:
                    self.held.close()
                    self.held = None


@dataclass
class Step:
    description: str
    action: Callable[[], None]


@dataclass
class RestoreReport:
    set_name: str
    host: str
    states: dict[str, str]
    details: dict[str, str] = field(default_factory=dict)
    safety_backup: str | None = None
    safety_verified: str | None = None
    seconds: float = 0.0
    writers_down_seconds: float = 0.0
    recovered: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"set": self.set_name, "host": self.host, "stores": self.states, "details": self.details,
                "safety_backup": self.safety_backup, "safety_verified": self.safety_verified,
                "duration_s": round(self.seconds, 1), "writers_down_s": round(self.writers_down_seconds, 1),
                "recovered": self.recovered}


class Restore:
    def __init__(self, settings: Settings, plan: RestorePlan, path: Path, manifest: dict, data, apps: dict,
                 console: Console, root: Path, take_backup: Callable, verify_set: Callable):
        self.s, self.plan, self.path, self.manifest = settings, plan, path, manifest
        self.data = data  # the data host's Session
        self.apps = apps  # alias -> Session of each application host whose writers stop (may be the data host)
        self.console, self.root = console, root
        self.take_backup, self.verify_set = take_backup, verify_set
        self.undo: list[Step] = []
        self.switched: list[str] = []
        self.guards: dict[str, Guard] = {}
        self.stopped: dict[str, tuple[str, ...]] = {}
        self.report = RestoreReport(path.name, data.alias, {s: UNCHANGED for s in plan.services})
        self.phase: dict[str, str] = {s: "planned" for s in plan.services}
        self.live_influx: dict = {}
        self.minio_existed: list[str] = []
        self.outcomes: list[tuple[str, str]] = []

    # -- helpers --------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        self.console.phase(self.data.alias, message)

    def container(self, service: str) -> str:
        """The running container of ``service``, looked up now (a restarted one has a new id and address)."""
        for c in self.data.containers():
            if c.service == service and c.running:
                return c.name
        raise HealthdeployError(f"{self.data.alias}: {service} is not running", "`fab status` shows the stack")

    def object_store(self):
        from deploy.backup.run import object_store

        # The published port is read again every time: a restarted object store comes back on another one.
        return object_store(self.s, self.data.host, self.container("minio"))

    def register(self, description: str, action: Callable[[], None], guard_commands=(), host: str | None = None):
        """Register an undo BEFORE its action runs (every action is idempotent)."""
        self.undo.append(Step(description, action))
        guard = self.guards.get(host or self.data.alias)
        for command in guard_commands:
            if guard is not None:
                guard.push(command)

    def set_phase(self, service: str, phase: str) -> None:
        self.phase[service] = phase
        guard = self.guards.get(self.data.alias)
        if guard is not None:
            guard.write_plan(self.journal_record())

    def journal_record(self) -> dict:
        return {"plan": self.plan.record(), "phase": self.phase, "minio_existed": self.minio_existed}

    def record(self, service: str) -> dict:
        from deploy.backup.run import artifact_record

        name = {"postgres": "postgres.dump", "influxdb": "influxdb.tar", "minio": "minio.tar",
                "mongodb": "mongodb.archive.gz"}[service]
        return artifact_record(self.manifest, name)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> RestoreReport:
        started = time.monotonic()
        try:
            self.arm_guards()
            self.stop_writers()
            writers_stopped = time.monotonic()
            checkpoint(self.console, self.data.alias, "writers-stopped")
            if self.plan.safety_backup:
                self.safety_backup()
            checkpoint(self.console, self.data.alias, "safety-backup")
            for store in self.plan.stores:
                self.stage(store.service)
                checkpoint(self.console, self.data.alias, f"loaded-{store.service}")
            checkpoint(self.console, self.data.alias, "loaded")
            for store in self.plan.stores:
                self.switch(store.service)
                checkpoint(self.console, self.data.alias, f"switched-{store.service}")
            self.start_writers()
            self.report.writers_down_seconds = time.monotonic() - writers_stopped
            checkpoint(self.console, self.data.alias, "writers-started")
        except BaseException as exc:
            self.fail(exc)
            raise RestoreFailed(exc, self.report.states, self.outcomes) from None
        self.commit()
        self.report.seconds = time.monotonic() - started
        return self.report

    def arm_guards(self) -> None:
        hosts = {self.data.alias: self.data, **self.apps}
        for alias, session in hosts.items():
            guard = Guard(session, f"{session.t.shared}/restore/{self.plan.stamp}")
            self.guards[alias] = guard  # before arming: a half-armed guard is disarmed too
            guard.arm(self.journal_record())
            # The lock's holder waits for the guard before it releases the lock (see WAIT_GUARD).
            session.undo.push("the restore guard's undo", rs.wait_for_guard(guard.dir))

    def fail(self, exc: BaseException) -> None:
        """Undo everything registered, newest first, each to its end; then the stores' states."""
        lost = isinstance(exc, ConnectionLost)
        outcomes = []
        with shielded():
            for step in reversed(self.undo):
                try:
                    step.action()
                    outcomes.append((step.description, "undone"))
                except BaseException as error:  # keep undoing the rest
                    message = getattr(error, "message", None) or str(error) or type(error).__name__
                    outcomes.append((step.description, f"failed: {message}"))
                    self.console.warn(f"{self.data.alias}: undo of {step.description} failed: {message}")
            self.undo.clear()
        self.outcomes = outcomes
        clean = all(o == "undone" for _, o in outcomes)
        for service in self.plan.services:
            undone = all(o == "undone" for d, o in outcomes if d.startswith(service))
            self.report.states[service] = UNCHANGED if undone and not lost else FAILED
        if lost:
            for service in self.plan.services:
                self.report.details[service] = "connection lost: the host's guard undoes what was done"
        for guard in self.guards.values():
            try:
                # Undone here: the guard must not act. Not undone (or lost): it stays armed and the guard
                # runs the undo script when we close, the journal stays for the next restore.
                if clean and not lost:
                    guard.disarm()
                elif guard.held is not None:
                    guard.held.close()
            except BaseException:
                pass

    def commit(self) -> None:
        """Everything is switched and the writers are healthy: the previous copies and staging go."""
        self.undo.clear()
        for service in self.plan.services:
            self.report.states[service] = RESTORED
        with shielded():
            for alias, guard in self.guards.items():  # first: no undo may run after this point
                try:
                    guard.disarm(remove=False)
                except (HealthdeployError, KeyboardInterrupt) as exc:
                    self.console.warn(f"{alias}: could not disarm the restore guard ({exc}): if the connection "
                                      "dropped, the guard may have put the previous data back; check before going on")
            for service in reversed(self.plan.services):
                try:
                    self.cleanup(service)
                except (HealthdeployError, KeyboardInterrupt) as exc:
                    self.console.warn(f"{self.data.alias}: removing the previous copy of {service}: {exc} "
                                      "(the next restore removes it)")
            for alias, guard in self.guards.items():
                try:
                    guard.session.run(fs.remove_tree(guard.dir))
                except (HealthdeployError, KeyboardInterrupt):
                    pass

    # -- writers ------------------------------------------------------------------------------------------
    def stop_writers(self) -> None:
        for alias, session in self.apps.items():
            ids = tuple(c.id for c in session.containers() if c.service in WRITERS and c.running)
            if not ids:
                continue
            self.stopped[alias] = ids
            self.register(f"writers on {alias}", lambda session=session, ids=ids: self._start(session, ids),
                          [dk.start_containers(ids)], host=alias)
            session.say(f"stopping the application's writers ({len(ids)} container(s))")
            session.run(dk.stop_containers(ids))

    def _start(self, session, ids: tuple[str, ...]) -> None:
        from deploy.backup.run import facts_release
        from deploy.execute.gateway import Gateway
        from deploy.execute.wait import wait_for

        session.run(dk.start_containers(ids))

        own_check = HealthNow(session.run)  # not only at Docker's next probe

        def healthy():
            current = own_check.all_of([c for c in session.containers() if c.id in ids])
            return True if current and all(c.healthy for c in current) else None
        wait_for(healthy, self.s.health_timeout, "the application's writers healthy again",
                 hint="`fab health` and `fab logs SERVICE` show why")
        # A restarted container may have another address: the gateway is pointed at what runs now.
        Gateway(session).refresh(facts_release(session.host, self.s))
        session.say("application writers started again and back in the gateway")

    def start_writers(self) -> None:
        for alias, ids in self.stopped.items():
            self._start(self.apps[alias], ids)

    # -- the safety backup -----------------------------------------------------------------------------
    def safety_backup(self) -> None:
        self.say("safety backup of the current data (the writers are stopped: nothing written after it is lost)")
        safety = self.take_backup()
        self.report.safety_backup = safety.name
        report = self.verify_set(safety)
        self.report.safety_verified = report["result"]
        if report["result"] != "ok":
            raise IntegrityError(f"the safety backup {safety.name} failed its restore drill",
                                 "nothing was changed; see its verify.json")
        self.say(f"safety backup {safety.name} verified by a restore drill")

    # -- stage beside the live data ------------------------------------------------------------------
    def stage(self, service: str) -> None:
        getattr(self, f"stage_{service}")()
        self.set_phase(service, "staged")

    def switch(self, service: str) -> None:
        self.set_phase(service, "switching")
        getattr(self, f"switch_{service}")()
        self.switched.append(service)
        self.set_phase(service, "switched")

    def cleanup(self, service: str) -> None:
        getattr(self, f"cleanup_{service}")()

    def _send(self, command, record: dict, structured=()) -> None:
        from deploy.backup.run import _check_content, _unsealed
        from deploy.execute.ssh import progress_printer

        with _unsealed(self.s, self.path, record) as source:
            result = self.data.host.stream_from_file(command, source, progress=progress_printer(record["file"]),
                                                     structured=structured)
        _check_content(self.path, record, result.sha256)

    # PostgreSQL
    def stage_postgres(self) -> None:
        from deploy.backup.run import artifact_record

        store = self.plan.store("postgres")
        container = self.container("postgres")
        self.register("postgres: drop the staging database",
                      lambda: self.data.run(rs.postgres_drop_databases(self.container("postgres"), store.staging)),
                      [rs.postgres_drop_databases(container, store.staging)])
        self.data.run(rs.postgres_drop_databases(container, store.staging))  # a leftover of the same name
        self.data.run(rs.postgres_create_database(container, store.staging))
        globals_record = artifact_record(self.manifest, "postgres-globals.sql")
        if globals_record and self.plan.apply_globals:
            self._send(bk.postgres_restore_globals(container), globals_record)
        elif globals_record:
            self.console.warn(f"{self.data.alias}: roles (postgres-globals.sql) not applied: the set is not signed")
        dump = self.record("postgres")
        self._send(rs.postgres_load(container, store.staging), dump)
        restored = bk.parse_rows(self.data.run(bk.postgres_row_counts(container, store.staging)).text)
        from deploy.backup.run import _differences

        mismatches = _differences(dump.get("rows", {}), restored)
        if mismatches:
            raise IntegrityError(f"postgres: the database loaded beside the live one differs from the set: "
                                 f"{'; '.join(mismatches[:3])}", "the set cannot be trusted; use another")
        self.say(f"postgres loaded beside the live data as {store.staging}: {len(restored)} tables, "
                 f"{sum(restored.values())} rows, as recorded")

    def switch_postgres(self) -> None:
        store = self.plan.store("postgres")
        container = self.container("postgres")
        self.register("postgres: switch back",
                      lambda: self.data.run(rs.postgres_unswitch(self.container("postgres"), store.live, store.previous,
                                                                 store.staging)),
                      [rs.postgres_unswitch(container, store.live, store.previous, store.staging)])
        self.data.run(rs.postgres_switch(container, store.live, store.previous, store.staging))
        self.say(f"postgres switched: {store.live} is the restored database (the previous one kept as {store.previous})")

    def cleanup_postgres(self) -> None:
        store = self.plan.store("postgres")
        self.data.run(rs.postgres_drop_databases(self.container("postgres"), store.staging, store.previous))

    # InfluxDB
    def _influx_counts(self, container: str, database: str, t0: str) -> dict:
        result = self.data.run(bk.influx_counts(container, database, t0), structured=bk.STRUCTURED)
        return bk.parse_influx_counts(result.err, database)

    def _influx_layout(self, container: str, database: str) -> tuple[list[str], dict]:
        measurements = rs.parse_measurements(rs.influx_results(
            self.data.run(rs.influx_query(container, database, "SHOW MEASUREMENTS")).text))
        shards = rs.parse_shard_groups(rs.influx_results(
            self.data.run(rs.influx_query(container, "", "SHOW SHARDS")).text), database)
        return measurements, shards

    def _copy(self, container: str, source: str, target: str, rps: list[dict], cqs: list[dict],
              description: str):
        measurements, shards = self._influx_layout(container, source)
        statements = (rs.recreate_statements(target, rps) + rs.copy_statements(source, target, measurements, shards)
                      + rs.cq_statements(target, cqs))
        return rs.influx_exec(container, statements, description), len(statements)

    def stage_influxdb(self) -> None:
        from deploy.backup.run import influx_mismatches

        if self.s.influx_version != "1":
            return  # 2.x: restored into a new bucket and renamed in one command at the switch (builder only)
        store = self.plan.store("influxdb")
        container = self.container("influxdb")
        record = self.record("influxdb")
        recorded = record.get("influx") or {}
        if not recorded.get("t0"):
            raise IntegrityError(f"{record['file']}: the set recorded no InfluxDB cut-off (T0)",
                                 "this set cannot be checked; take a new backup")
        drop = rs.influx_exec(container, [("", f"DROP DATABASE {rs.ident(store.staging)}"),
                                          ("", f"DROP DATABASE {rs.ident(store.previous)}")],
                              "drop the staging and previous InfluxDB databases")
        self.register("influxdb: drop the staging and previous databases", lambda: self.data.run(drop), [drop])
        self.data.run(drop)
        self._send(bk.influx_stage(container, store.live, store.staging), record)
        restored = self._influx_counts(container, store.staging, recorded["t0"])
        mismatches = influx_mismatches(recorded, restored)
        if mismatches:
            raise IntegrityError(f"influxdb: the database loaded beside the live one differs from the set: "
                                 f"{'; '.join(mismatches[:3])}", "the set cannot be trusted; use another")
        # The live data, kept: its retention policies, continuous queries, and a copy in bounded batches.
        live = bk.parse_influx_counts(
            self.data.run(bk.influx_counts(container, store.live, "2262-01-01T00:00:00Z"),
                          structured=bk.STRUCTURED).err, store.live)
        self.live_influx = {"rps": live.get("retention_policies", []), "cqs": live.get("continuous_queries", [])}
        copy, count = self._copy(container, store.live, store.previous, self.live_influx["rps"], [],
                                 f"keep the live InfluxDB data as {store.previous}")
        self.data.run(copy)
        self.say(f"influxdb loaded beside the live data as {store.staging} ({len(restored['series'])} measurements, "
                 f"counts as recorded up to {recorded['t0']}); live data kept as {store.previous} ({count} statements)")

    def switch_influxdb(self) -> None:
        from deploy.backup.run import influx_mismatches

        store = self.plan.store("influxdb")
        container = self.container("influxdb")
        if self.s.influx_version != "1":
            self.register("influxdb: (2.x) no undo after the bucket rename", lambda: None)
            self._send(bk.influx_restore(container, self.s.influx_version, self.s.influx_bucket),
                       self.record("influxdb"))
            return
        record = self.record("influxdb")
        recorded = record.get("influx") or {}
        set_rps = recorded.get("retention_policies") or self.live_influx["rps"]
        set_cqs = recorded["continuous_queries"] if "continuous_queries" in recorded else self.live_influx["cqs"]
        back, _ = self._copy(container, store.previous, store.live, self.live_influx["rps"], self.live_influx["cqs"],
                             f"recreate {store.live} from {store.previous}")
        self.register("influxdb: recreate the live database from its previous copy", lambda: self.data.run(back), [back])
        forward, count = self._copy(container, store.staging, store.live, set_rps, set_cqs,
                                    f"recreate {store.live} from the restored {store.staging}")
        self.data.run(forward, timeout=max(300, count * 2))
        restored = self._influx_counts(container, store.live, recorded["t0"])
        mismatches = influx_mismatches(recorded, restored)
        if mismatches:
            raise IntegrityError(f"influxdb: the live database after the copy differs from the set: "
                                 f"{'; '.join(mismatches[:3])}", "the previous data is put back")
        self.say(f"influxdb switched: {store.live} recreated with {len(set_rps)} retention policies and "
                 f"{len(set_cqs)} continuous queries, {count} bounded statements, counts as recorded")

    def cleanup_influxdb(self) -> None:
        if self.s.influx_version != "1":
            return
        store = self.plan.store("influxdb")
        self.data.run(rs.influx_exec(self.container("influxdb"), [("", f"DROP DATABASE {rs.ident(store.staging)}"),
                                                                   ("", f"DROP DATABASE {rs.ident(store.previous)}")],
                                     "drop the staging and previous InfluxDB databases"))

    # MongoDB (builder only: no MongoDB server runs here)
    def stage_mongodb(self) -> None:
        store = self.plan.store("mongodb")
        container = self.container("mongodb")
        drop = bk.mongo_drop_database(container, store.staging)
        self.register("mongodb: drop the staging database", lambda: self.data.run(drop), [drop])
        self._send(bk.mongo_stage(container, store.live, store.staging), self.record("mongodb"))

    def switch_mongodb(self) -> None:
        store = self.plan.store("mongodb")
        container = self.container("mongodb")
        back = bk.mongo_swap(container, store.live, store.staging, store.previous)
        self.register("mongodb: rename the collections back", lambda: self.data.run(back), [back])
        self.data.run(bk.mongo_swap(container, store.live, store.previous, store.staging))

    def cleanup_mongodb(self) -> None:
        store = self.plan.store("mongodb")
        container = self.container("mongodb")
        self.data.run(bk.mongo_drop_database(container, store.staging))
        self.data.run(bk.mongo_drop_database(container, store.previous))

    # MinIO
    def _buckets(self) -> dict[str, tuple[str, str]]:
        from deploy.plan.restore import bucket_names

        return bucket_names(self.plan.buckets, self.plan.stamp)

    def stage_minio(self) -> None:
        from deploy.backup import objects
        from deploy.backup.run import _check_content, _ContentRead, _differences, _unsealed
        from deploy.execute.ssh import progress_printer

        names = self._buckets()
        record = self.record("minio")

        def drop_staging():
            client = self.object_store()
            for new, prev in names.values():
                objects.remove_bucket(client, new)
                objects.remove_bucket(client, prev)
        self.register("minio: remove the staging and previous buckets", drop_staging)
        client = self.object_store()
        with _unsealed(self.s, self.path, record) as source:
            counted = _ContentRead(source)
            objects.restore_objects(client, counted, progress_printer(record["file"]),
                                    bucket_of=lambda b: names[b][0] if b in names else _unknown_bucket(b))
            while counted.read(1 << 20):
                pass
        _check_content(self.path, record, counted.sha256.hexdigest())
        staged = objects.count_objects(client, [names[b][0] for b in sorted(names)])
        restored = {b: staged[names[b][0]] for b in sorted(names)}
        mismatches = _differences(record.get("objects", {}), restored)
        if mismatches:
            raise IntegrityError(f"minio: the staging buckets differ from the set: {'; '.join(mismatches[:3])}",
                                 "the set cannot be trusted; use another")
        live = set(objects.list_bucket_names(client))
        self.minio_existed = sorted(b for b in names if b in live)
        for bucket in self.minio_existed:
            objects.sync_bucket(client, bucket, names[bucket][1])
        self.say(f"minio loaded beside the live data into {len(names)} staging bucket(s), "
                 f"{sum(r['objects'] for r in restored.values())} objects as recorded; live objects kept in "
                 f"{len(self.minio_existed)} previous bucket(s)")

    def switch_minio(self) -> None:
        from deploy.backup import objects
        from deploy.backup.run import _differences

        names = self._buckets()
        existed = list(self.minio_existed)

        def back():
            client = self.object_store()
            for bucket in names:
                if bucket in existed:
                    objects.sync_bucket(client, names[bucket][1], bucket)
                else:
                    objects.remove_bucket(client, bucket)
        self.register("minio: copy the previous objects back", back)
        client = self.object_store()
        for bucket in sorted(names):
            objects.sync_bucket(client, names[bucket][0], bucket)
        restored = objects.count_objects(client, sorted(names))
        mismatches = _differences(self.record("minio").get("objects", {}), restored)
        if mismatches:
            raise IntegrityError(f"minio: the live buckets after the copy differ from the set: {'; '.join(mismatches[:3])}",
                                 "the previous objects are put back")
        others = sorted(set(objects.list_bucket_names(client)) - set(names)
                        - {n for pair in names.values() for n in pair})
        detail = (f"{sum(r['objects'] for r in restored.values())} objects, "
                  f"{sum(r['bytes'] for r in restored.values())} bytes")
        if others:
            detail += f"; buckets not in the set, left alone: {', '.join(others)}"
        self.report.details["minio"] = detail
        self.say(f"minio switched: {detail}")

    def cleanup_minio(self) -> None:
        from deploy.backup import objects

        client = self.object_store()
        for new, prev in self._buckets().values():
            objects.remove_bucket(client, new)
            objects.remove_bucket(client, prev)


class SwarmRestore(Restore):
    """TARGET=swarm: the same restore on the data node's task containers. The writers are scaled to 0 through
    the manager (a stopped task's container would be replaced by a new task) and back to the replica counts
    they had; the manager's guard scales them back if we vanish. No gateway step: the gateways follow the
    writers' new tasks through Swarm's DNS, as after a deploy."""

    def __init__(self, settings: Settings, plan: RestorePlan, path: Path, manifest: dict, data, manager, placement,
                 console: Console, root: Path, take_backup: Callable, verify_set: Callable):
        # The manager is the one "application host": its guard holds the writers' undo (data may be it too).
        super().__init__(settings, plan, path, manifest, data, {manager.alias: manager}, console, root,
                         take_backup, verify_set)
        self.manager, self.placement = manager, placement
        self.replicas: dict[str, int] = {}

    def container(self, service: str) -> str:
        return self.placement.container(service)

    def stop_writers(self) -> None:
        from deploy.commands import swarm as sc

        replicas = self.placement.writer_replicas(WRITERS)
        if not replicas:
            return
        self.replicas = replicas
        self.register(f"writers scaled back through {self.manager.alias}",
                      lambda: self.placement.scale_back(replicas),
                      [sc.scale_writers(self.s.stack_name, replicas, "scale the writers back")], host=self.manager.alias)
        self.placement.scale_down(replicas)

    def start_writers(self) -> None:
        if self.replicas:
            self.placement.scale_back(self.replicas)


def _unknown_bucket(name: str) -> str:
    raise IntegrityError(f"the object archive has bucket {name!r} that its manifest does not list",
                         "this set cannot be trusted")


# -- what an earlier restore left ----------------------------------------------------------------------
def recover_journals(settings: Settings, session, console: Console, own_stamp: str = "",
                     container_of: Callable[[str], str | None] | None = None) -> list[str]:
    """An earlier restore that did not end (our process killed, the connection dropped) left a journal: its
    guard ran the shell undo (or runs it now, if it never could); the object copies only this process can
    make are undone here; its staging and previous copies go. Returns what was done, one line each.
    ``container_of`` names the running container of a service on the session's host (Swarm: its task's)."""
    from deploy.backup import objects
    from deploy.backup.run import object_store
    from deploy.plan.restore import bucket_names

    done = []
    journals = rs.parse_journals(session.run(rs.journal_state(f"{session.t.shared}/restore")).text)
    for stamp, journal in sorted(journals.items()):
        if stamp == own_stamp:
            continue
        directory = f"{session.t.shared}/restore/{stamp}"
        log = journal["log"]
        recovered = any("HEALTHDEPLOY-RECOVERED" in line for line in log)
        if journal["armed"] and not recovered:
            session.say(f"restore {stamp} did not end and its guard did not undo it: running its undo script now")
            session.run(rs.run_undo(directory), timeout=1800)
        elif not journal["armed"] and not recovered and not log:
            session.run(fs.remove_tree(directory))  # disarmed: it ended (a leftover directory only)
            continue
        record = journal.get("plan") or {}
        plan = record.get("plan") or {}
        phase = record.get("phase") or {}
        if "minio" in phase and plan.get("buckets") is not None:
            names = bucket_names(tuple(plan["buckets"]), plan["stamp"])
            if container_of is None:
                container = next((c.name for c in session.containers() if c.service == "minio" and c.running), None)
            else:
                container = container_of("minio")
            if container:
                client = object_store(settings, session.host, container)
                existed = record.get("minio_existed") or []
                if phase["minio"] in ("switching", "switched"):
                    for bucket in names:
                        if bucket in existed:
                            objects.sync_bucket(client, names[bucket][1], bucket)
                        else:
                            objects.remove_bucket(client, bucket)
                    done.append(f"restore {stamp}: the object copies were put back from its previous buckets")
                for new, prev in names.values():
                    objects.remove_bucket(client, new)
                    objects.remove_bucket(client, prev)
        session.run(fs.remove_tree(directory))
        done.append(f"restore {stamp}: recovered ({'by its guard' if recovered else 'now'}); staging removed")
        console.phase(session.alias, done[-1])
    return done
