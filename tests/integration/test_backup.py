"""`inv backup` / `inv restore` / `inv backup.verify` against the real sandbox stack (PostgreSQL 15,
InfluxDB 1.6 and an S3 server standing in for MinIO: SeaweedFS, same API; real sshd; real Docker).
The tests reach the S3 server through its port published on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sandbox_env import TEST_HOSTS, _cleanup, new_env

HOST = TEST_HOSTS[2]
PROJECT = f"hd-tbk-{HOST}"
PG = f"{PROJECT}-postgres-1"
INFLUX = f"{PROJECT}-influxdb-1"
S3 = f"{PROJECT}-minio-1"
MARKER = b"PATIENT-REPORT-MARKER-6c1f"  # must never be readable in an encrypted set


def s3():
    from minio import Minio

    port = subprocess.run(["docker", "port", S3, "9000/tcp"], capture_output=True, text=True,
                          check=True).stdout.split()[0].rsplit(":", 1)[1]
    return Minio(f"127.0.0.1:{port}", access_key="sandboxadmin", secret_key="sandbox-s3-secret-93aa", secure=False)


def s3_snapshot() -> dict:
    """Every object: size, SHA-256 of its bytes, content type, user metadata, tags."""
    client, state = s3(), {}
    for bucket in sorted(b.name for b in client.list_buckets()):
        for o in client.list_objects(bucket, recursive=True):
            stat = client.stat_object(bucket, o.object_name)
            body = client.get_object(bucket, o.object_name)
            try:
                digest = hashlib.sha256(body.read()).hexdigest()
            finally:
                body.close()
                body.release_conn()
            meta = {k.lower(): v for k, v in stat.metadata.items() if k.lower().startswith("x-amz-meta-")}
            state[(bucket, o.object_name)] = (stat.size, digest, stat.content_type, json.dumps(meta, sort_keys=True),
                                              json.dumps(dict(client.get_object_tags(bucket, o.object_name) or {})))
    return state


def seed_objects() -> None:
    from minio.commonconfig import Tags

    client = s3()
    for bucket in ("health-files", "avatars"):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    report = MARKER * 100
    client.put_object("health-files", "reports/p1.pdf", io.BytesIO(report), len(report), content_type="application/pdf",
                      metadata={"x-amz-meta-patient": "1", "Cache-Control": "max-age=60"})
    big = os.urandom(6 << 20)  # above the 5 MiB part size: restored as a multipart upload
    client.put_object("health-files", "scans/big.bin", io.BytesIO(big), len(big))
    client.put_object("health-files", "中文/报告 1.txt", io.BytesIO("血压 120/80".encode()), len("血压 120/80".encode()),
                      content_type="text/plain; charset=utf-8")
    tags = Tags(for_object=True)
    tags["kind"] = "avatar"
    client.put_object("avatars", "p1.png", io.BytesIO(b"\x89PNG" + os.urandom(3000)), 3004, content_type="image/png",
                      tags=tags)


def destroy_objects() -> None:
    client = s3()
    client.remove_object("health-files", "reports/p1.pdf")
    client.put_object("health-files", "scans/big.bin", io.BytesIO(b"overwritten"), 11)
    client.put_object("health-files", "extra/junk.txt", io.BytesIO(b"not in the backup"), 17)
    client.remove_object("avatars", "p1.png")
    client.remove_bucket("avatars")


def psql(sql: str) -> str:
    out = subprocess.run(["docker", "exec", PG, "psql", "-X", "-U", "admin", "-d", "health_mgmt", "-tAc", sql],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


# InfluxDB runs with HTTP auth: curl as the admin user from the container's environment (config on stdin).
INFLUX_CURL = ["docker", "exec", INFLUX, "sh", "-c",
               'printf \'user = "%s:%s"\\n\' "$INFLUXDB_ADMIN_USER" "$INFLUXDB_ADMIN_PASSWORD" | curl -K - "$@"', "sh"]


def influx(q: str, write: str | None = None) -> dict:
    if write:
        subprocess.run([*INFLUX_CURL, "-fsS", "-XPOST", "http://127.0.0.1:8086/write?db=health_data",
                        "--data-binary", write], check=True, capture_output=True)
        return {}
    out = subprocess.run([*INFLUX_CURL, "-fsS", "-G", "http://127.0.0.1:8086/query",
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
    seed_objects()
    before = (psql(ROW_CHECKSUM), psql("SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM readings r"),
              json.dumps(influx("SELECT * FROM /.*/"), sort_keys=True))
    objects_before = s3_snapshot()
    assert len(objects_before) == 4

    proc = inv(env, "backup", "--env", "bk", "--services", "postgres,influxdb,minio", "--json")
    assert proc.returncode == 0, proc.stderr
    [backup_set] = sets(env)
    manifest = json.loads((backup_set / "manifest.json").read_text())
    assert manifest["env"] == "bk" and manifest["host"] == HOST and manifest["release"]
    files = {a["file"]: a for a in manifest["artifacts"]}
    assert set(files) == {"postgres.dump", "postgres-globals.sql", "influxdb.tar", "minio.tar"}
    assert files["minio.tar"]["objects"]["health-files"]["objects"] == 3
    assert files["minio.tar"]["objects"]["avatars"] == {"objects": 1, "bytes": 3004}
    assert files["influxdb.tar"]["influx"]["points"] == {"bp": {"dia": 2, "sys": 2}, "hr": {"bpm": 1}}
    assert files["influxdb.tar"]["influx"]["series"] == {"bp": 2, "hr": 1}
    rows = files["postgres.dump"]["rows"]
    assert rows["public.patients"] == 5000 and rows["public.readings"] == 20000
    assert rows == {t: int(psql(f"SELECT count(*) FROM {t}")) for t in rows}  # every table, as it is
    assert files["postgres.dump"]["engine_version"].startswith("postgres (PostgreSQL) 15")
    for name in files:
        assert oct((backup_set / name).stat().st_mode & 0o777) == "0o600"
    assert "sandbox-db-7f3a9c" not in proc.stdout + proc.stderr

    # Destroy: rows gone, a table dropped, a role dropped, a measurement dropped.
    psql("DELETE FROM patients WHERE id % 3 = 0")
    psql("DROP TABLE readings")
    psql("DROP ROLE report_reader")
    subprocess.run([*INFLUX_CURL, "-fsS", "-XPOST", "http://127.0.0.1:8086/query",
                    "--data-urlencode", "db=health_data", "--data-urlencode", "q=DROP MEASUREMENT hr"],
                   check=True, capture_output=True)
    destroy_objects()
    assert s3_snapshot() != objects_before
    proc = inv(env, "restore", "--env", "bk", "--from", backup_set.name, "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "safety backup" in proc.stderr and "bk: healthy" in proc.stdout
    result, _ = json.JSONDecoder().raw_decode(proc.stdout.lstrip())  # the result, then `fab health`'s table
    assert result.get("stores") == {"postgres": "restored", "influxdb": "restored", "minio": "restored"}, proc.stdout
    assert result.get("safety_verified") == "ok"
    after = (psql(ROW_CHECKSUM), psql("SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM readings r"),
             json.dumps(influx("SELECT * FROM /.*/"), sort_keys=True))
    assert after == before
    assert s3_snapshot() == objects_before  # bytes, content type, metadata and tags; the extra object removed
    assert "buckets not in the set" not in proc.stderr
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
    checks = {c["service"]: c for c in report["checks"]}
    assert checks["postgres"]["tables"]["public.readings"] == 20000
    assert checks["influxdb"]["result"] == "ok" and checks["influxdb"]["series"] == {"bp": 2, "hr": 1}
    assert checks["minio"]["result"] == "ok"
    assert checks["minio"]["buckets"]["avatars"] == {"objects": 1, "bytes": 3004}
    assert not subprocess.run(["docker", "ps", "-aq", "--filter", f"name=hd-verify-{HOST}-"], capture_output=True,
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


def test_encrypted_compressed_set_round_trip(env, tmp_path):
    key = tmp_path / "backup.key"
    proc = inv(env, "backup.keygen", "--out", str(key))
    assert proc.returncode == 0, proc.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    recipient = next(line.split("=", 1)[1] for line in proc.stdout.splitlines()
                     if line.startswith("BACKUP_AGE_RECIPIENTS="))
    assert recipient.startswith("age1") and "AGE-SECRET-KEY" not in proc.stdout + proc.stderr
    env.write(hosts=HOST, BACKUP_COMPRESSION="zstd", BACKUP_AGE_RECIPIENTS=recipient)
    try:
        known = set(sets(env))
        proc = inv(env, "backup", "--env", "bk", "--services", "postgres,minio")
        assert proc.returncode == 0, proc.stderr
        [sealed] = set(sets(env)) - known
        manifest = json.loads((sealed / "manifest.json").read_text())
        files = {a["artifact"]: a for a in manifest["artifacts"]}
        assert files["postgres.dump"]["file"] == "postgres.dump.age"  # pg_dump compresses: no zstd on top
        assert files["postgres-globals.sql"]["file"] == "postgres-globals.sql.zst.age"
        assert files["minio.tar"]["file"] == "minio.tar.zst.age"
        assert files["minio.tar"]["sealing"]["encryption"]["recipients"] == [recipient]
        assert files["minio.tar"]["sealing"]["compression"] == "zstd"
        for a in files.values():
            data = (sealed / a["file"]).read_bytes()
            assert data.startswith(b"age-encryption.org/v1") and MARKER not in data
            assert hashlib.sha256(data).hexdigest() == a["sha256"] and len(data) == a["bytes"]
        assert manifest["encryption"] == "age"

        # No private key configured: refused in one line before anything on the host is touched.
        psql("DELETE FROM patients WHERE id % 5 = 0")
        damaged = psql(ROW_CHECKSUM)
        proc = inv(env, "restore", "--env", "bk", "--from", sealed.name, "--yes")
        assert proc.returncode == 2
        assert "postgres.dump.age is encrypted with age and BACKUP_AGE_IDENTITY_FILE is not set" in proc.stderr
        assert psql(ROW_CHECKSUM) == damaged and len(set(sets(env)) - known) == 1  # no safety backup either

        # The wrong key: the drill says it cannot decrypt (exit 8), naming the file.
        other = tmp_path / "other.key"
        assert inv(env, "backup.keygen", "--out", str(other)).returncode == 0
        env.write(hosts=HOST, BACKUP_COMPRESSION="zstd", BACKUP_AGE_RECIPIENTS=recipient,
                  BACKUP_AGE_IDENTITY_FILE=str(other))
        proc = inv(env, "backup.verify", "--env", "bk", "--from", sealed.name)
        assert proc.returncode == 8 and "cannot decrypt" in proc.stderr and ".age" in proc.stderr
        # ... and a restore with it is refused before any writer stops or any safety backup is taken.
        proc = inv(env, "restore", "--env", "bk", "--from", sealed.name, "--yes")
        assert proc.returncode == 8 and "cannot decrypt" in proc.stderr, proc.stderr
        assert "stopping" not in proc.stderr and "safety backup" not in proc.stderr
        assert psql(ROW_CHECKSUM) == damaged and len(set(sets(env)) - known) == 1

        env.write(hosts=HOST, BACKUP_COMPRESSION="zstd", BACKUP_AGE_RECIPIENTS=recipient,
                  BACKUP_AGE_IDENTITY_FILE=str(key))
        proc = inv(env, "backup.verify", "--env", "bk", "--from", sealed.name, "--json")
        assert proc.returncode == 0, proc.stderr
        assert {c["service"]: c["result"] for c in json.loads(proc.stdout)["checks"]} == {"postgres": "ok", "minio": "ok"}
        objects_before = s3_snapshot()
        destroy_objects()
        proc = inv(env, "restore", "--env", "bk", "--from", sealed.name, "--yes", "--no-safety-backup")
        assert proc.returncode == 0, proc.stderr
        assert psql(ROW_CHECKSUM) != damaged and s3_snapshot() == objects_before
    finally:
        env.write(hosts=HOST)


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
    # The next backup removes what the killed one left (older, its owner gone).
    proc = inv(env, "backup", "--env", "bk", "--services", "postgres")
    assert proc.returncode == 0 and f"removed {partial[0].name}" in proc.stderr, proc.stderr
    assert not [p for p in root.iterdir() if p.name.startswith(".partial-")]


def test_a_drill_of_2000_tables_compares_every_table(env):
    psql("CREATE SCHEMA wide")
    psql("DO $$ BEGIN FOR i IN 1..2000 LOOP EXECUTE format('CREATE TABLE wide.t%s (id int)', i); "
         "EXECUTE format('INSERT INTO wide.t%s SELECT generate_series(1, %s)', i, i % 5); END LOOP; END $$")
    try:
        known = set(sets(env))
        proc = inv(env, "backup", "--env", "bk", "--services", "postgres")
        assert proc.returncode == 0, proc.stderr
        [wide] = set(sets(env)) - known
        rows = json.loads((wide / "manifest.json").read_text())["artifacts"][0]["rows"]
        assert len([t for t in rows if t.startswith("wide.")]) == 2000 and rows["wide.t1999"] == 4
        started = time.monotonic()
        proc = inv(env, "backup.verify", "--env", "bk", "--from", wide.name, "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert report["result"] == "ok" and len(report["checks"][0]["tables"]) >= 2003
        print(f"2,000-table drill: ok in {time.monotonic() - started:.1f}s, "
              f"{len(report['checks'][0]['tables'])} tables compared")
    finally:
        psql("DROP SCHEMA wide CASCADE")


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
