"""`inv backup` / `inv restore` / `inv backup.verify` against the real sandbox stack (PostgreSQL 15 and
InfluxDB 1.6 servers; real sshd; real Docker)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sandbox_env import _cleanup, new_env

HOST = "sandbox7"
PROJECT = "hd-tbk-sandbox7"
PG = f"{PROJECT}-postgres-1"
INFLUX = f"{PROJECT}-influxdb-1"


def psql(sql: str) -> str:
    out = subprocess.run(["docker", "exec", PG, "psql", "-X", "-U", "admin", "-d", "health_mgmt", "-tAc", sql],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def influx(q: str, write: str | None = None) -> dict:
    if write:
        subprocess.run(["docker", "exec", INFLUX, "curl", "-fsS", "-XPOST", "http://127.0.0.1:8086/write?db=health_data",
                        "--data-binary", write], check=True, capture_output=True)
        return {}
    out = subprocess.run(["docker", "exec", INFLUX, "curl", "-fsS", "-G", "http://127.0.0.1:8086/query",
                          "--data-urlencode", "db=health_data", "--data-urlencode", f"q={q}"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


ROW_CHECKSUM = ("SELECT count(*) || ':' || md5(coalesce(string_agg(p::text, ',' ORDER BY id), '')) FROM patients p")


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "bk")
    env.write(hosts=HOST)
    _cleanup(env)
    proc = env.fab("deploy", hosts=HOST)
    assert proc.returncode == 0, proc.stderr
    env.home = tmp_path_factory.mktemp("home")  # backups/ lands in HEALTHDEPLOY_HOME
    yield env
    _cleanup(env)


def inv(env, *args, **kw):
    return env.run("inv", *args, extra_env={"HEALTHDEPLOY_HOME": str(env.home)}, **kw)


def sets(env) -> list[Path]:
    root = env.home / "backups" / "bk"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_backup_destroy_restore_is_identical(env):
    psql("INSERT INTO patients(mrn, full_name) SELECT 'MRN' || g, 'patient ' || g FROM generate_series(1, 5000) g")
    psql("CREATE TABLE readings (id serial PRIMARY KEY, patient int, sys int, note text)")
    psql("INSERT INTO readings(patient, sys, note) SELECT g % 97, 100 + g % 60, repeat('x', g % 50) FROM generate_series(1, 20000) g")
    psql("DO $$ BEGIN CREATE ROLE report_reader LOGIN PASSWORD 'rr-pass-123'; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    influx(None, write="bp,patient=1 sys=120,dia=80 1700000000000000000\nbp,patient=2 sys=130,dia=85 1700000001000000000\n"
                        "hr,patient=1 bpm=70 1700000002000000000")
    before = (psql(ROW_CHECKSUM), psql("SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM readings r"),
              json.dumps(influx("SELECT * FROM /.*/"), sort_keys=True))

    proc = inv(env, "backup", "--env", "bk", "--services", "postgres,influxdb", "--json")
    assert proc.returncode == 0, proc.stderr
    [backup_set] = sets(env)
    manifest = json.loads((backup_set / "manifest.json").read_text())
    assert manifest["env"] == "bk" and manifest["host"] == HOST and manifest["release"]
    files = {a["file"]: a for a in manifest["artifacts"]}
    assert set(files) == {"postgres.dump", "postgres-globals.sql", "influxdb.tar"}
    assert files["postgres.dump"]["rows"] == {"public.patients": 5000, "public.readings": 20000,
                                              "public.schema_migrations": 1}
    assert files["postgres.dump"]["engine_version"].startswith("postgres (PostgreSQL) 15")
    for name in files:
        assert oct((backup_set / name).stat().st_mode & 0o777) == "0o600"
    assert "sandbox-db-7f3a9c" not in proc.stdout + proc.stderr

    # Destroy: rows gone, a table dropped, a role dropped, a measurement dropped.
    psql("DELETE FROM patients WHERE id % 3 = 0")
    psql("DROP TABLE readings")
    psql("DROP ROLE report_reader")
    subprocess.run(["docker", "exec", INFLUX, "curl", "-fsS", "-XPOST", "http://127.0.0.1:8086/query",
                    "--data-urlencode", "db=health_data", "--data-urlencode", "q=DROP MEASUREMENT hr"],
                   check=True, capture_output=True)
    proc = inv(env, "restore", "--env", "bk", "--from", backup_set.name, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "safety backup" in proc.stderr and "bk: healthy" in proc.stdout
    after = (psql(ROW_CHECKSUM), psql("SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM readings r"),
             json.dumps(influx("SELECT * FROM /.*/"), sort_keys=True))
    assert after == before
    assert psql("SELECT count(*) FROM pg_roles WHERE rolname = 'report_reader'") == "1"
    assert len(sets(env)) == 2  # the set and the safety backup taken before the restore
    audit = (Path(f"/var/lib/healthdeploy-test/{HOST}/bk/shared/audit.log")).read_text()
    assert '"event": "restore"' in audit and "sandbox-db-7f3a9c" not in audit


def test_restore_drill_verifies_the_set(env):
    backup_set = sets(env)[0]
    proc = inv(env, "backup.verify", "--env", "bk", "--from", backup_set.name, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((backup_set / "verify.json").read_text())
    assert report["result"] == "ok"
    assert report["checks"][0]["tables"]["public.readings"] == 20000
    assert not subprocess.run(["docker", "ps", "-aq", "--filter", "name=hd-verify-"], capture_output=True,
                              text=True).stdout.strip()  # the throwaway container is gone
    listing = json.loads(inv(env, "backup.list", "--env", "bk", "--json").stdout)
    assert {s["set"]: s["verified"] for s in listing["sets"]}[backup_set.name] == "ok"


def test_a_set_with_one_flipped_byte_is_refused_and_live_data_untouched(env):
    good = sets(env)[0]
    bad = good.parent / (good.name + "-flipped")
    shutil.copytree(good, bad)
    dump = bad / "postgres.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    (bad / "verify.json").unlink(missing_ok=True)
    before = psql(ROW_CHECKSUM)
    try:
        for args in (("restore", "--env", "bk", "--from", bad.name, "--yes"),
                     ("backup.verify", "--env", "bk", "--from", bad.name)):
            proc = inv(env, *args)
            assert proc.returncode == 8, proc.stderr
            assert f"{dump}: SHA-256 differs from the manifest (corrupt)" in proc.stderr
        shutil.copy2(good / "postgres.dump", dump)
        truncated = bad / "influxdb.tar"
        truncated.write_bytes(truncated.read_bytes()[:-100])
        proc = inv(env, "restore", "--env", "bk", "--from", bad.name, "--yes")
        assert proc.returncode == 8 and "influxdb.tar has" in proc.stderr and "truncated or corrupt" in proc.stderr
        assert psql(ROW_CHECKSUM) == before
    finally:
        shutil.rmtree(bad)


def test_a_backup_killed_halfway_leaves_no_good_set(env):
    psql("INSERT INTO readings(patient, sys, note) SELECT g, g, repeat(md5(g::text), 40) FROM generate_series(1, 300000) g")
    count = len(sets(env))
    proc = subprocess.Popen(["inv", "backup", "--env", "bk", "--services", "postgres"], cwd=os.getcwd(),
                            env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(env.directory),
                                 "HEALTHDEPLOY_HOME": str(env.home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = env.home / "backups" / "bk"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = [p for p in root.iterdir() if p.name.startswith(".partial-")]
        if partial and any(f.stat().st_size > 0 for f in partial[0].iterdir()):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(sets(env)) == count  # nothing new looks like a set
    listing = json.loads(inv(env, "backup.list", "--env", "bk", "--json").stdout)
    assert len(listing["sets"]) == count
    partial = [p for p in root.iterdir() if p.name.startswith(".partial-")]
    assert partial, "the interrupted set stays under its temporary name"
    refused = inv(env, "restore", "--env", "bk", "--from", str(partial[0]), "--yes")
    assert refused.returncode == 2 and "is not a backup set (no manifest.json)" in refused.stderr


def test_prune_keeps_the_newest_verified_set(env):
    assert inv(env, "backup", "--env", "bk", "--services", "postgres").returncode == 0
    before = sets(env)
    verified = [p for p in before if (p / "verify.json").exists()
                and json.loads((p / "verify.json").read_text())["result"] == "ok"]
    assert verified and len(before) >= 3
    dry = inv(env, "backup.prune", "--env", "bk", "--last", "1", "--daily", "0", "--weekly", "0", "--monthly", "0",
              "--dry-run")
    assert dry.returncode == 0 and "would delete" in dry.stdout and sets(env) == before
    proc = inv(env, "backup.prune", "--env", "bk", "--last", "1", "--daily", "0", "--weekly", "0", "--monthly", "0")
    assert proc.returncode == 0, proc.stderr
    assert sets(env) == sorted({verified[-1], before[-1]})
