"""`fab deploy` end to end: real sshd, real Docker, real PostgreSQL/Redis/nginx, continuous HTTP load.

The tests of this module share one environment and run in order (each builds on the live release
the previous one left), which keeps CI within its time budget.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from sandbox_env import MAIN, MAIN_ADDRESS, _cleanup, get_json, get_text, new_env
from load import Load

HOST = MAIN_ADDRESS  # the gateway binds to the host's address (GATEWAY_BIND={address})
SECRETS = ("sandbox-db-7f3a9c", "sandbox-redis-51d2", "sandbox-jwt-secret-not-for-production-4e1f",
           "sandbox-s3-secret-93aa", "sandbox-mqtt-2b6e", "sandbox-influx-token-0c4b")


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "dep")
    _cleanup(env)
    yield env
    _cleanup(env)


def deploy(env, *args, hosts=MAIN):
    proc = env.fab("deploy", *args, hosts=hosts)
    for secret in SECRETS:  # secrets never reach the operator's output
        assert secret not in proc.stdout and secret not in proc.stderr
    return proc


def rolled_under_load(env, port: int, change, path: str = "/api/build"):
    with Load(HOST, port, rate=100, path=path) as load:
        time.sleep(1.5)
        change()
        proc = deploy(env, "--json")
        time.sleep(1.5)
    return proc, load.result


def summary(proc) -> dict:
    start = proc.stdout.index("{")
    return json.loads(proc.stdout[start:])["hosts"][0]


def test_first_deploy_brings_the_stack_up_healthy(env):
    proc = deploy(env, "--json")
    assert proc.returncode == 0, proc.stderr
    out = summary(proc)
    assert out["result"] == "deployed" and out["migrated"] is True
    assert sorted(out["services"]) == ["ai-service", "backend", "frontend-patient", "frontend-web"]
    for port, service in ((5000, "backend"), (8001, "ai-service")):
        assert get_json(f"http://{HOST}:{port}/health")["service"] == service
    for port, service in ((3000, "frontend-web"), (3001, "frontend-patient")):  # nginx: /health is "ok"
        assert get_text(f"http://{HOST}:{port}/health") == "ok\n"
        assert get_json(f"http://{HOST}:{port}/build.json")["service"] == service
    assert get_json(f"http://{HOST}:3000/api/build")["service"] == "backend"  # /api/ goes to the backend
    # The migration made a real schema change in PostgreSQL.
    tables = subprocess.run(["docker", "exec", f"hd-tdep-{MAIN}-postgres-1", "psql", "-U", "admin", "-d", "health_mgmt",
                             "-tAc", "select name from schema_migrations"], capture_output=True, text=True)
    assert tables.stdout.split() == ["001_create_patients.sql", "002_create_requests.sql"]
    root = env.deploy_root()
    assert (root / "current").is_symlink() and (root / "current" / "compose.yaml").is_file()
    assert oct((root / "shared/env/backend.env").stat().st_mode & 0o777) == "0o600"
    audit = (root / "shared/audit.log").read_text()
    assert '"event": "deploy"' in audit and not any(secret in audit for secret in SECRETS)
    assert not (root / ".lock").exists()


def test_no_change_deploy_uploads_nothing_and_rebuilds_nothing(env):
    before = sorted(p.name for p in (env.deploy_root() / "releases").iterdir())
    proc = deploy(env, "--json")
    assert proc.returncode == 0, proc.stderr
    out = summary(proc)
    assert out["result"] == "unchanged" and out["uploaded_bytes"] == 0 and out["uploaded_files"] == 0
    assert "building images" not in proc.stderr
    assert sorted(p.name for p in (env.deploy_root() / "releases").iterdir()) == before


def test_backend_roll_under_load_fails_no_request(env):
    proc, load = rolled_under_load(env, 5000, lambda: env.set_build("backend", "backend-v2"))
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["services"] == ["backend"]  # only what changed rolls
    assert summary(proc)["uploaded_files"] == 1
    assert load.total > 200 and load.failed == 0, load.errors[:5]
    assert get_json(f"http://{HOST}:5000/api/build")["build"] == "backend-v2"
    assert set(load.builds) == {"backend-v1", "backend-v2"}


def test_frontend_roll_under_load_fails_no_request(env):
    proc, load = rolled_under_load(env, 3001, lambda: env.set_build("frontend-patient", "patient-v2"), path="/")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["services"] == ["frontend-patient"]
    assert load.total > 200 and load.failed == 0, load.errors[:5]
    assert set(load.builds) == {"frontend-patient-v1", "patient-v2"}  # the build meta tag of index.html
    assert get_json(f"http://{HOST}:3001/build.json")["build"] == "patient-v2"


def test_ai_service_roll_under_load_fails_no_request(env):
    proc, load = rolled_under_load(env, 8001, lambda: env.set_build("ai-service", "ai-v2"))
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["services"] == ["ai-service"]
    assert load.total > 200 and load.failed == 0, load.errors[:5]
    assert get_json(f"http://{HOST}:8001/api/build")["build"] == "ai-v2"


def test_unhealthy_build_is_rolled_back_with_zero_failed_requests(env):
    live = (env.deploy_root() / "current").resolve().name

    def break_backend():
        env.set_build("backend", "backend-broken")
        (env.app / "backend" / "health_mode").write_text("fail\n")

    proc, load = rolled_under_load(env, 5000, break_backend)
    assert proc.returncode == 5, proc.stderr  # distinct exit code: rolled back
    assert "backend failed: new container" in proc.stderr and "unhealthy" in proc.stderr
    assert "last log lines of backend" in proc.stderr
    assert load.failed == 0, load.errors[:5]
    assert get_json(f"http://{HOST}:5000/api/build")["build"] == "backend-v2"
    assert (env.deploy_root() / "current").resolve().name == live
    running = subprocess.run(["docker", "ps", "--filter", f"label=com.docker.compose.project=hd-tdep-{MAIN}",
                              "--filter", "label=com.docker.compose.service=backend", "-q"], capture_output=True, text=True)
    assert len(running.stdout.split()) == 1  # the new container was removed
    (env.app / "backend" / "health_mode").unlink()
    env.set_build("backend", "backend-v2")


def test_failing_migration_aborts_before_any_switch(env):
    live = (env.deploy_root() / "current").resolve().name
    releases = sorted(p.name for p in (env.deploy_root() / "releases").iterdir())
    bad = env.app / "backend" / "migrations" / "002_broken.sql"
    bad.write_text("ALTER TABLE no_such_table ADD COLUMN x int;\n")
    env.set_build("backend", "backend-v3")
    try:
        proc = deploy(env)
    finally:
        bad.unlink()
        env.set_build("backend", "backend-v2")
    assert proc.returncode == 1, proc.stderr
    assert "migration failed, nothing was switched" in proc.stderr
    assert "no_such_table" in proc.stderr
    assert get_json(f"http://{HOST}:5000/api/build")["build"] == "backend-v2"
    assert (env.deploy_root() / "current").resolve().name == live
    assert sorted(p.name for p in (env.deploy_root() / "releases").iterdir()) == releases
    assert not (env.deploy_root() / ".lock").exists()


def test_held_lock_refuses_a_second_deploy(env):
    holder = subprocess.Popen(["sleep", "60"])
    lock = env.deploy_root() / ".lock"
    try:
        lock.mkdir()
        (lock / "holder.pid").write_text(str(holder.pid))
        (lock / "info.json").write_text(json.dumps({"who": "alice@laptop", "since": "2026-11-28T10:00:00Z",
                                                    "release": "r-other", "pid": 4242, "machine": "laptop"}))
        env.set_build("backend", "backend-v4")
        proc = deploy(env)
        assert proc.returncode == 4, proc.stderr
        assert "another deploy holds the lock (held: alice@laptop since 2026-11-28T10:00:00Z for release r-other" in proc.stderr
        status = env.fab("lock.status", "--json")
        assert json.loads(status.stdout)["locks"][0]["state"] == "held"
        holder.kill()
        holder.wait()
        proc = deploy(env)  # the holder is gone: stale, refused without --break-lock
        assert proc.returncode == 4 and "lock is stale" in proc.stderr and "--break-lock" in proc.stderr
        proc = deploy(env, "--break-lock")
        assert proc.returncode == 0, proc.stderr
        assert "breaking stale lock" in proc.stderr
        assert get_json(f"http://{HOST}:5000/api/build")["build"] == "backend-v4"
    finally:
        holder.kill()
        subprocess.run(["rm", "-rf", str(lock)])


def test_dry_run_plans_and_changes_nothing(env):
    live = (env.deploy_root() / "current").resolve().name
    env.set_build("frontend-web", "web-v9")
    proc = deploy(env, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    live_build = (env.deploy_root() / "current" / "src/frontend-web/build_id").read_text()
    assert "would send src/frontend-web/build_id (changed)" in proc.stderr, (live_build, proc.stderr)
    assert "would rebuild: frontend-web" in proc.stderr
    assert (env.deploy_root() / "current").resolve().name == live
    assert get_json(f"http://{HOST}:3000/build.json")["build"] != "web-v9"
    env.set_build("frontend-web", "frontend-web-v1")


def test_rollback_returns_to_the_previous_release_without_rebuilding(env):
    releases = sorted(p.name for p in (env.deploy_root() / "releases").iterdir())
    live = (env.deploy_root() / "current").resolve().name
    previous = [r for r in releases if r < live][-1]
    previous_build = (env.deploy_root() / "releases" / previous / "src/backend/build_id").read_text().strip()
    assert previous_build != get_json(f"http://{HOST}:5000/api/build")["build"]
    with Load(HOST, 5000, rate=100) as load:
        time.sleep(1)
        proc = env.fab("rollback")
        time.sleep(1)
    assert proc.returncode == 0, proc.stderr
    assert "building images" not in proc.stderr
    assert load.result.failed == 0, load.result.errors[:5]
    assert (env.deploy_root() / "current").resolve().name == previous
    assert get_json(f"http://{HOST}:5000/api/build")["build"] == previous_build  # containers really moved
    assert len(list((env.deploy_root() / "releases").iterdir())) <= 3  # KEEP_RELEASES=3 in the test env
    audit = env.fab("audit", "--json", "--lines", "50")
    events = [e["event"] for e in json.loads(audit.stdout)["entries"]]
    assert "rollback" in events and "lock-broken" in events
