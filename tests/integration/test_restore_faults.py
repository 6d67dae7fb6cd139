"""Restore fault injection on a real sandbox host (real sshd, Docker, PostgreSQL 15, InfluxDB 1.6, SeaweedFS S3)
under HTTP load through the gateway.

At each restore point (after the writers stopped; after the safety backup; during the load beside the live
data; just after the PostgreSQL switch) the local restore process is killed with SIGKILL, or separately its SSH
connection is dropped (the sshd session processes of that connection are killed on the host). After each:

- the data is either the old data completely or the restored data completely (row checksums of PostgreSQL,
  every InfluxDB point, the object listing with sizes and SHA-256),
- the writers run again (the host's guard started them),
- no temporary database or throwaway container is left (staging buckets: removed by the next restore),
- the lock is stale or free,
- the next `inv restore --break-lock` succeeds and leaves nothing behind.

A table (point, requests sent, failed, recovery) is printed and written to $HEALTHDEPLOY_RESULTS_DIR/restore-faults.md (default: pytest's temporary directory).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from load import Load
from sandbox_env import TEST_HOSTS, _cleanup, new_env
from deploy.core.settings import PROJECT_ROOT
from deploy.sandbox import hosts as sandbox

HOST = TEST_HOSTS[1]
ADDRESS = sandbox.host_for(HOST).address
PROJECT = f"hd-trf-{HOST}"
PG, INFLUX, S3 = (f"{PROJECT}-{s}-1" for s in ("postgres", "influxdb", "minio"))
POINTS = ("writers-stopped", "safety-backup", "loaded-postgres", "switched-postgres")


def sh(*argv, check=True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check).stdout.strip()


def psql(sql: str, db: str = "health_mgmt") -> str:
    return sh("docker", "exec", PG, "psql", "-X", "-U", "admin", "-d", db, "-tAc", sql)


# InfluxDB runs with HTTP auth: the admin credentials from the container's environment, on curl's stdin.
INFLUX_CURL = ("docker", "exec", INFLUX, "sh", "-c",
               'printf \'user = "%s:%s"\\n\' "$INFLUXDB_ADMIN_USER" "$INFLUXDB_ADMIN_PASSWORD" | curl -K - "$@"', "sh")


def influx(q: str, db: str = "health_data") -> dict:
    return json.loads(sh(*INFLUX_CURL, "-fsS", "-G", "http://127.0.0.1:8086/query",
                         "--data-urlencode", f"db={db}", "--data-urlencode", f"q={q}"))


def influx_write(lines: str) -> None:
    sh(*INFLUX_CURL, "-fsS", "-XPOST", "http://127.0.0.1:8086/write?db=health_data", "--data-binary", lines)


def s3():
    from minio import Minio

    port = sh("docker", "port", S3, "9000/tcp").split()[0].rsplit(":", 1)[1]
    return Minio(f"127.0.0.1:{port}", access_key="sandboxadmin", secret_key="sandbox-s3-secret-93aa", secure=False)


def objects() -> dict:
    """Every object of the application's buckets (a restore's staging buckets are leftovers, counted apart)."""
    client, state = s3(), {}
    for bucket in sorted(b.name for b in client.list_buckets() if not b.name.startswith(("hd-new-", "hd-prev-"))):
        for o in client.list_objects(bucket, recursive=True):
            body = client.get_object(bucket, o.object_name)
            try:
                state[f"{bucket}/{o.object_name}"] = (o.size, hashlib.sha256(body.read()).hexdigest())
            finally:
                body.close()
                body.release_conn()
    return state


def state() -> tuple:
    """What must be all old or all new: patients and readings row checksums, every point, every object."""
    rows = psql("SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM patients p") + "|" + psql(
        "SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM readings r")
    return rows, json.dumps(influx("SELECT * FROM /.*/"), sort_keys=True), json.dumps(objects(), sort_keys=True)


def leftovers() -> list[str]:
    databases = psql("SELECT datname FROM pg_database", db="postgres").split()
    series = influx("SHOW DATABASES")["results"][0].get("series", [{}])[0].get("values", [])
    left = [d for d in databases if "__hd_" in d] + [v[0] for v in series if "__hd_" in v[0]]
    left += sh("docker", "ps", "-a", "--format", "{{.Names}}", "--filter", f"name=hd-verify-{HOST}-").split()
    return left


def staging_buckets() -> list[str]:
    return [b.name for b in s3().list_buckets() if b.name.startswith(("hd-new-", "hd-prev-"))]


def writers_running() -> bool:
    names = sh("docker", "ps", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={PROJECT}")
    return all(any(f"-{w}-" in n for n in names.split()) for w in ("backend", "ai-service"))


def mutate(n: int) -> None:
    """Live data that differs from the set: rows, points, objects."""
    psql(f"INSERT INTO patients(mrn, full_name) SELECT 'NEW{n}-' || g, 'late ' || g FROM generate_series(1, 50) g")
    psql(f"UPDATE readings SET sys = sys + 1 WHERE id % 7 = {n % 7}")
    influx_write(f"bp,patient=9 sys={100 + n}i,dia=70 {1700000100 + n}000000000")
    data = f"late object {n}".encode()
    s3().put_object("health-files", f"late/{n}.txt", io.BytesIO(data), len(data))


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "rf")
    env.write(hosts=HOST)
    _cleanup(env)
    proc = env.fab("deploy", hosts=HOST)
    assert proc.returncode == 0, proc.stderr
    env.home = tmp_path_factory.mktemp("home")
    yield env
    _cleanup(env)


def inv(env, *args, **kw):
    return env.run("inv", *args, extra_env={"HEALTHDEPLOY_HOME": str(env.home)}, **kw)


def sshd_session_pids(client_pid: int) -> list[int]:
    """The sshd processes serving the SSH connection of local process ``client_pid`` to the sandbox host."""
    out = sh("ss", "-tnpH", "state", "established")
    ports = set()
    for line in out.splitlines():
        if f"pid={client_pid}," in line:
            local, peer = line.split()[2:4]
            if peer.startswith(f"{ADDRESS}:"):
                ports.add(local)
    pids = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3] in ports and "sshd" in line:
            pids.update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return sorted(pids)


def recovered(timeout: float = 90) -> float:
    """Seconds until the writers run again and every journal's guard finished."""
    started = time.monotonic()
    journals = Path(f"/var/lib/healthdeploy-test/{HOST}/rf/shared/restore")
    while time.monotonic() - started < timeout:
        logs = [p.read_text() for p in journals.glob("*/recovery.log")] if journals.exists() else []
        armed = list(journals.glob("*/armed")) if journals.exists() else []
        if writers_running() and not armed and all("HEALTHDEPLOY-RECOVER" in log for log in logs):
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError("the host did not recover within the timeout")


def lock_state(env) -> str:
    out = env.fab("lock.status", hosts=HOST).stdout
    return "free" if "free" in out else "stale" if "stale" in out else out.strip()[:80]


# Other checkouts' test suites on this machine remove every container labelled healthdeploy.role=drill when
# they start (their copy of sandbox_env.py predates host-named drills): a drill of ours can vanish under us.
# The restore then fails and undoes itself correctly; the case is run again (at most 3 times), and said so.
DISTURBED = ("No such container: hd-verify-", "is gone before it answered")


def disturbed(text: str) -> bool:
    return any(marker in text for marker in DISTURBED)


def restore_again(env, backup_set):
    """The next restore after the documented stale-lock step. Its safety backup is skipped (sandbox: the set
    is restored again and again; the killed runs take theirs), to keep the suite short."""
    for _ in range(3):
        again = inv(env, "restore", "--env", "rf", "--from", backup_set, "--yes", "--break-lock", "--no-safety-backup")
        if again.returncode == 7:  # restored, then `fab health` failed: on a machine this loaded, a probe can time out
            time.sleep(10)
            health = env.fab("health", hosts=HOST)
            print(f"(restore ok but health failed once: {again.stdout[-600:]!r}; health again: exit "
                  f"{health.returncode})", flush=True)
            if health.returncode == 0:
                return subprocess.CompletedProcess(again.args, 0, again.stdout, again.stderr)
        if again.returncode == 0 or not disturbed(again.stderr):
            return again
        print("(a drill container was removed by another checkout's test suite: restore run again)", flush=True)
    return again


def fault_case(env, backup_set, new, mode, point, n):
    """One kill at one point; the row of the table, or None when another suite disturbed the run."""
    mutate(n)
    old = state()
    assert old != new
    cmd = ["inv", "restore", "--env", "rf", "--from", backup_set, "--yes", "--break-lock"]
    if POINTS.index(point) > POINTS.index("safety-backup"):
        cmd.append("--no-safety-backup")  # the points after it are about the load and the switch
    with Load(ADDRESS, 5000, rate=40, workers=8) as load:
        time.sleep(1)
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(env.directory),
                                     "HEALTHDEPLOY_HOME": str(env.home),
                                     "HEALTHDEPLOY_RESTORE_PAUSE": f"{point}:25"}, text=True)
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if f"HEALTHDEPLOY-CHECKPOINT {point}" in line:
                break
        else:
            proc.wait()
            if disturbed("".join(seen)):
                print(f"({mode} at {point}: a drill container was removed by another checkout's test suite; "
                      "the restore undid itself; run again)", flush=True)
                assert state() == old and writers_running()
                return None
            raise AssertionError(f"{point}: the restore ended before the point: {''.join(seen)[-2000:]}")
        if mode == "SIGKILL":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            pids = sshd_session_pids(proc.pid)
            assert pids, f"{point}: no sshd session found for pid {proc.pid}"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        seconds = recovered()
        if mode == "ssh-drop":
            proc.wait(timeout=120)  # it notices the lost connection and ends (its undo cannot reach the host)
        time.sleep(1)
    proc.kill()
    proc.wait()
    after = state()
    assert after in (old, new), (f"{mode} at {point}: neither the old nor the restored data: differs from the "
                                 f"old in {[i for i in range(3) if after[i] != old[i]]}")
    assert after == old, f"{mode} at {point}: the guard should have put the old data back"
    assert leftovers() == [], f"{mode} at {point}: left {leftovers()}"
    assert writers_running()
    lock = lock_state(env)
    assert lock in ("free", "stale"), lock
    left_buckets = staging_buckets()
    again = restore_again(env, backup_set)
    assert again.returncode == 0, again.stderr[-3000:]
    assert state() == new and leftovers() == [] and staging_buckets() == [] and writers_running()
    assert lock_state(env) == "free"
    recovery = (f"guard: old data back, writers up {seconds:.1f}s after the kill; lock {lock}"
                + (f"; {len(left_buckets)} staging bucket(s) removed by the next restore" if left_buckets else "")
                + "; next restore --break-lock ok")
    return (f"{mode} at {point}", load.result.total, load.result.failed, recovery)


def test_restore_faults(env, tmp_path_factory):
    psql("INSERT INTO patients(mrn, full_name) SELECT 'MRN' || g, 'patient ' || g FROM generate_series(1, 3000) g")
    psql("CREATE TABLE readings (id serial PRIMARY KEY, patient int, sys int, note text)")
    psql("INSERT INTO readings(patient, sys, note) SELECT g % 97, 100 + g % 60, repeat('x', g % 50) "
         "FROM generate_series(1, 20000) g")
    influx_write("bp,patient=1 sys=120i,dia=80 1700000000000000000\nhr,patient=1 bpm=70 1700000002000000000")
    client = s3()
    if not client.bucket_exists("health-files"):
        client.make_bucket("health-files")
    client.put_object("health-files", "reports/p1.pdf", io.BytesIO(b"%PDF" * 1000), 4000)
    proc = inv(env, "backup", "--env", "rf", "--services", "postgres,influxdb,minio")
    assert proc.returncode == 0, proc.stderr
    backup_set = sorted(p.name for p in (env.home / "backups" / "rf").iterdir() if not p.name.startswith("."))[-1]
    new = state()

    rows = []
    n = 0
    # HEALTHDEPLOY_FAULT_CASES=mode:point,... runs only those (all 8 by default).
    only = {c.strip() for c in os.environ.get("HEALTHDEPLOY_FAULT_CASES", "").split(",") if c.strip()}
    for mode in ("ssh-drop", "SIGKILL"):
        for point in POINTS:
            if only and f"{mode}:{point}" not in only:
                continue
            for attempt in range(3):
                n += 1
                row = fault_case(env, backup_set, new, mode, point, n)
                if row is not None:
                    break
            else:
                raise AssertionError(f"{mode} at {point}: disturbed three times")
            rows.append(row)
            print(f"{row[0]}: {row[1]} requests, {row[2]} failed, {row[3]}", flush=True)

    table = ["| point | requests sent | failed | recovery |", "|---|---|---|---|"]
    table += [f"| {p} | {t} | {f} | {r} |" for p, t, f, r in rows]
    text = "\n".join(table)
    print("\n" + text)
    # Written where HEALTHDEPLOY_RESULTS_DIR says (e.g. bench/results to record a run), never into the checkout
    # by default: a test run leaves tracked files alone.
    results = Path(os.environ.get("HEALTHDEPLOY_RESULTS_DIR") or tmp_path_factory.getbasetemp())
    out = results / ("restore-faults.md" if not only else "restore-faults-partial.md")
    out.write_text("# Restore fault injection (tests/integration/test_restore_faults.py)\n\n"
                   f"HTTP load: 40 req/s through the gateway (GET /api/build reads PostgreSQL, POST /api/echo writes).\n"
                   "Requests fail while the writers are stopped (the restore's downtime) and until the guard has "
                   "started them again (failures after that are not counted apart).\n\n" + text + "\n")
