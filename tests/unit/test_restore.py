"""The restore orchestration (backup/restore.py) against a model of a data host (tests/fakes.py RestoreWorld)
through the recording executor: loaded beside the live data, checked, switched all at once; and every undo
path: a failure (a command error, an interrupt) at ANY command leaves every store exactly as it was, no staging
database behind, the writers running again and the guard disarmed; a lost connection leaves the guard armed
with an undo script that puts everything back. MinIO's S3 half is not modelled here (it needs a tunnel): the
integration tests cover it against SeaweedFS."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from deploy.backup.restore import Restore, RestoreFailed
from deploy.core.console import Console
from deploy.core.errors import HealthdeployError, RemoteCommandError
from deploy.core.settings import load_settings
from deploy.execute.executor import ConnectionLost, Interrupted
from deploy.execute.recording import RecordingHost
from deploy.execute.session import Session
from deploy.plan import restore as rp
from deploy.stack.render import Target
from fakes import FakeContainer, RestoreWorld

LIVE_ROWS = {"public.patients": 3, "public.readings": 7}
SET_ROWS = {"public.patients": 5000, "public.readings": 20000, "public.schema_migrations": 1}
LIVE_INFLUX = {"points": {"bp": {"sys": 1}}, "series": {"bp": 1}}
SET_INFLUX = {"points": {"bp": {"dia": 2, "sys": 2}, "hr": {"bpm": 1}}, "series": {"bp": 2, "hr": 1}}


def make_set(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "20260101T000000Z"
    path.mkdir(parents=True)
    artifacts = []
    for service, name, data, extra in (
            ("postgres", "postgres.dump", b"PGDMP fake", {"rows": SET_ROWS}),
            ("influxdb", "influxdb.tar", b"influx fake", {"influx": {"t0": "2026-01-01T00:00:00Z", **SET_INFLUX}})):
        (path / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        artifacts.append({"service": service, "artifact": name, "file": name, "bytes": len(data), "sha256": digest,
                          "content_bytes": len(data), "content_sha256": digest, "sealing": {}, **extra})
    manifest = {"format": 2, "env": "sandbox", "host": "h1", "kind": "backup", "artifacts": artifacts}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path, manifest


class Data:
    def __init__(self, tmp_path: Path):
        self.s = load_settings("sandbox", overrides={"HOSTS": "h1", "HEALTH_TIMEOUT": "2",
                                                     "BACKUP_SIGNING_KEY": "", "BACKUP_ALLOWED_SIGNERS": ""})
        self.target = Target.of(self.s, "h1", "10.0.0.1")
        self.world = RestoreWorld(self.target.deploy_path, self.target.project, "img")
        self.world.pg = {"health_mgmt": dict(LIVE_ROWS), "postgres": {}}
        self.world.influx = {"health_data": json.loads(json.dumps(LIVE_INFLUX))}
        self.world.set_rows, self.world.set_influx = dict(SET_ROWS), json.loads(json.dumps(SET_INFLUX))
        for cid, service in (("c0001", "postgres"), ("c0002", "influxdb"), ("c0003", "backend"),
                             ("c0004", "ai-service"), ("c0005", "gateway")):
            self.world.containers.append(FakeContainer(cid + "0000000", service, "r1", "img", f"172.18.0.{cid[-1]}"))
        self.path, self.manifest = make_set(tmp_path)
        self.plan = rp.RestorePlan(
            set_name=self.path.name, env="sandbox", data_host="h1", stamp="20260102030405",
            stores=rp.store_plans(("postgres", "influxdb"), "20260102030405", "health_mgmt", "health_data", "1", (),
                                  {}),
            writers=(rp.WriterStop("h1", ("backend", "ai-service")),), lock_hosts=("h1",), safety_backup=True,
            safety_services=("postgres", "influxdb"), checks=(), signed_by="SHA256:x", apply_globals=True)
        self.safety_taken = 0

    def restore(self, **fail) -> tuple[Restore, RecordingHost]:
        host = RecordingHost(self.world, **fail)
        session = Session(host, self.s, self.target, Console(out=io.StringIO(), err=io.StringIO()))

        def take_backup():
            self.safety_taken += 1
            # the writers are stopped when the safety backup is taken
            assert all(c.state != "running" for c in self.world.containers if c.service in ("backend", "ai-service"))
            return self.path.parent / "safety"

        run = Restore(self.s, self.plan, self.path, self.manifest, session, {"h1": session}, session.console,
                      self.path.parent, take_backup=take_backup, verify_set=lambda p: {"result": "ok"})
        return run, host

    def leftovers(self) -> list[str]:
        return sorted(n for n in [*self.world.pg, *self.world.influx] if rp.is_staging_name(n))

    def writers_running(self) -> bool:
        return all(c.state == "running" for c in self.world.containers)

    def armed(self) -> bool:
        return any(p.endswith("/armed") for p in self.world.files)


def test_a_restore_loads_beside_checks_and_switches_every_store(tmp_path):
    d = Data(tmp_path)
    run, host = d.restore()
    report = run.run()
    assert report.states == {"postgres": "restored", "influxdb": "restored"}
    assert d.world.pg["health_mgmt"] == SET_ROWS
    assert d.world.influx["health_data"] == SET_INFLUX
    assert d.leftovers() == [] and d.writers_running() and not d.armed() and d.safety_taken == 1
    assert d.world.journal == []  # committed: nothing left for the lock's holder
    kinds = [i[0] for i in host.intents()]
    # every store loaded and checked before the first switch; the writers stopped before the safety backup
    assert kinds.index("stop") < kinds.index("pg-create")
    assert max(i for i, k in enumerate(kinds) if k in ("pg-load", "influx-stage", "pg-rows")) < kinds.index("pg-switch")
    assert kinds.index("pg-switch") < kinds.index("start-ids")
    # InfluxDB: the live database kept as "previous" before the switch, copied in bounded statements
    copies = [i for i in host.intents(("influx-exec",)) if "SELECT * INTO" in json.dumps(i)]
    assert copies and all("WHERE time >=" in s for i in copies for _, s in i[2] if s.startswith("SELECT"))


def test_a_count_mismatch_beside_the_live_data_changes_nothing(tmp_path):
    d = Data(tmp_path)
    d.world.set_rows = {**SET_ROWS, "public.readings": 19999}  # the load lost a row
    run, _ = d.restore()
    with pytest.raises(RestoreFailed) as failed:
        run.run()
    assert "differs from the set" in failed.value.message and failed.value.exit_code == 8
    assert failed.value.states == {"postgres": "unchanged", "influxdb": "unchanged"}
    assert d.world.pg["health_mgmt"] == LIVE_ROWS and d.world.influx["health_data"] == LIVE_INFLUX
    assert d.leftovers() == [] and d.writers_running() and not d.armed()


def commands_of_a_restore(tmp_path) -> int:
    d = Data(tmp_path / "count")
    run, host = d.restore()
    run.run()
    return len(host.commands)


@pytest.mark.parametrize("error", [RemoteCommandError("injected", 1, "boom"), Interrupted()],
                         ids=["command-error", "interrupt"])
def test_a_failure_at_any_command_leaves_every_store_as_it_was(tmp_path, error):
    total = commands_of_a_restore(tmp_path)
    assert total > 30
    for n in range(1, total + 1):
        d = Data(tmp_path / f"{n}")
        run, host = d.restore(fail_at=n, error=error)
        try:
            run.run()
        except RestoreFailed as failed:
            assert set(failed.states.values()) == {"unchanged"}, (n, host.failed, failed.states)
        else:  # the failed command was one whose failure the restore tolerates (e.g. after the commit)
            assert d.world.pg["health_mgmt"] == SET_ROWS, (n, host.failed)
            continue
        assert d.world.pg["health_mgmt"] == LIVE_ROWS, (n, host.failed.description)
        assert d.world.influx["health_data"] == LIVE_INFLUX, (n, host.failed.description)
        assert d.leftovers() == [], (n, host.failed.description, d.leftovers())
        assert d.writers_running(), (n, host.failed.description)
        assert not d.armed(), (n, host.failed.description)
        assert d.world.journal == [], (n, host.failed.description)


def test_a_lost_connection_leaves_the_guard_armed_with_the_undo(tmp_path):
    d = Data(tmp_path)
    run, host = d.restore(fail_when=lambda c: c.intent[:1] == ("influx-exec",) and "recreate health_data from the "
                          "restored" in c.description, error=ConnectionLost("connection to h1 was lost", "x"))
    with pytest.raises(RestoreFailed) as failed:
        run.run()
    assert set(failed.value.states.values()) == {"failed"}  # not known here: the host's guard undoes it
    assert d.armed()
    # the lock's holder waits for the guard before it releases the lock
    assert [e[2] for e in d.world.journal] == ["the restore guard's undo"]
    script = next(v for p, v in d.world.files.items() if p.endswith("/undo.sh")).decode()
    # newest first: InfluxDB recreated from its previous copy, PostgreSQL renamed back, staging dropped,
    # the writers started
    order = [script.index(x) for x in ("recreate health_data from health_data__hd_prev",
                                       "switch database health_mgmt back", "drop database(s) health_mgmt__hd_new",
                                       "docker start")]
    assert order == sorted(order)


def test_the_plan_says_what_happens(tmp_path):
    d = Data(tmp_path)
    text = "\n".join(d.plan.lines())
    assert "health_mgmt__hd_new_20260102030405" in text and "rows per table" in text
    assert "stop writers on h1: backend, ai-service" in text and "safety backup after the writers stop" in text
    assert "bounded batches" in text
    assert rp.pg_names("x" * 80, "20260102030405")[0].endswith("__hd_new_20260102030405")
    assert len(rp.pg_names("x" * 80, "20260102030405")[0]) == 63


def test_resource_needs_and_problems():
    disk, memory = rp.resource_needs({"postgres": 1_000_000_000, "minio": 500_000_000}, ("postgres",))
    assert disk == 4256 and memory == 256
    assert rp.resource_needs({"postgres": 10}, ("postgres", "minio"), drill=True)[1] == 1024
    problems = rp.resource_problems(4256, 256, 1000, 5000, 8000, "/var/lib/docker", "the restore")
    assert problems == ["the restore needs about 4256 MB free under the Docker root /var/lib/docker, it has 1000 MB"]
