"""TARGET=swarm end to end on a real swarm of three namespaced engines (the testbed), a real registry, real
PostgreSQL, and HTTP load through the gateway that counts every failed request.

Node roles: nodes[0] manager + data, nodes[1] and nodes[2] app + edge (each runs a gateway in host mode).
The tests share one stack and run in order; each builds on what the previous one left. Run them beside the
other suites: its nodes are its own (testbed_env.GROUPS["swarm"], node4-6).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from deploy.commands.backup import SECRETS_PRELUDE
from deploy.core.settings import PROJECT_ROOT
from deploy.sandbox import netns
from load import Load
from swarm_env import CHECKSUM_SQL, ENV_NAME, STACK, get_json, psql, summary, wait_until
from testbed_env import docker, nodes_of_group

testbed_hosts = nodes_of_group("swarm")

pytestmark = pytest.mark.swarm

SECRETS = ("sandbox-db-7f3a9c", "sandbox-redis-51d2", "sandbox-jwt-secret-not-for-production-4e1f",
           "sandbox-s3-secret-93aa", "sandbox-mqtt-2b6e", "testbed-registry-pass-5d1e")
RESULTS: dict = {}  # what each test measured, printed at the end (pytest -s) for the report


def deploy(env, *args):
    proc = env.fab("deploy", *args)
    for secret in SECRETS:  # never in the operator's output
        assert secret not in proc.stdout and secret not in proc.stderr, secret
    return proc


def manager_docker(env, *args):
    return docker(env.manager, *args)


def running_nodes(env, service: str) -> list[str]:
    out = manager_docker(env, "service", "ps", f"{STACK}_{service}", "--filter", "desired-state=running",
                         "--format", "{{.Node}} {{.CurrentState}}").stdout
    return sorted(line.split()[0] for line in out.splitlines() if " Running " in f" {line} ")


def checksum(env) -> str:
    return psql(env.manager, env.container_of(env.manager, "postgres"), CHECKSUM_SQL)


# InfluxDB runs with HTTP auth: curl as the admin user from the task's secrets file (a Swarm secret; loaded as
# healthdeploy's own commands load it), the credentials on curl's stdin.
INFLUX_CURL = SECRETS_PRELUDE + ('printf \'user = "%s:%s"\\n\' "$INFLUXDB_ADMIN_USER" "$INFLUXDB_ADMIN_PASSWORD" '
                                 '| curl -K - "$@"')


def influx(env, query: str | None = None, write: str | None = None, post: bool = False) -> dict:
    """A query (GET; ``post`` for a statement that changes something) or a write, in the task's container."""
    container = env.container_of(env.manager, "influxdb")
    if write:
        proc = manager_docker(env, "exec", container, "sh", "-c", INFLUX_CURL, "sh", "-fsS", "-XPOST",
                              "http://127.0.0.1:8086/write?db=health_data", "--data-binary", write)
        assert proc.returncode == 0, proc.stderr
        return {}
    proc = manager_docker(env, "exec", container, "sh", "-c", INFLUX_CURL, "sh", "-fsS",
                          "-XPOST" if post else "-G", "http://127.0.0.1:8086/query", "--data-urlencode",
                          "db=health_data", "--data-urlencode", f"q={query}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write_rows(env, count: int) -> None:
    for i in range(count):
        get_json(env.url(5000, "/api/echo"), data=json.dumps({"n": i}).encode())


def test_first_deploy_is_healthy_through_every_gateway(swarm_cluster):
    env = swarm_cluster
    started = time.monotonic()
    proc = deploy(env, "--json")
    RESULTS["first deploy s"] = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, proc.stderr
    out = summary(proc)
    host = out["hosts"][0]
    assert host["result"] == "deployed" and host["migrated"] is True
    assert {s["service"] for s in out["services"]} >= {"backend", "ai-service", "frontend-web", "frontend-patient",
                                                        "gateway", "postgres", "redis"}
    for node in (env.edge, env.other):  # both edge nodes publish the gateway in host mode
        for port, service in ((5000, "backend"), (8001, "ai-service")):
            assert get_json(env.url(port, "/health", node))["service"] == service
        assert get_json(env.url(3000, "/api/build", node))["service"] == "backend"  # /api/ goes to the backend
    # `fab health --json`: every service, node and task.
    health = env.fab("health", "--json")
    assert health.returncode == 0, health.stdout[-3000:] + health.stderr
    report = json.loads(health.stdout)
    assert report["healthy"] and report["target"] == "swarm"
    assert {n["node"] for n in report["nodes"]} == {n.name for n in env.nodes}
    services = {s["service"]: s for s in report["services"]}
    assert set(services) == {"gateway", "backend", "ai-service", "frontend-web", "frontend-patient", "postgres",
                             "redis", "influxdb", "emqx", "minio"}
    assert all(s["running"] == s["replicas"] for s in services.values()), services
    tasks = report["tasks"]
    assert len([t for t in tasks if t["service"] == "backend" and t["state"] == "running"]) == 2
    assert {t["node"] for t in tasks if t["service"] in ("postgres", "redis")} == {env.manager.name}  # pinned
    assert {t["node"] for t in tasks if t["service"] == "gateway"} == {env.edge.name, env.other.name}
    assert all(a.startswith("10.254.0.") for t in tasks for a in t["addresses"])  # the explicit subnet
    # Images by digest from the registry; secrets in no stack file, no service spec, no task's environment.
    stack_file = (env.deploy_root() / "current" / "stack.yaml").read_text()
    assert re.search(r"image: 10\.251\.0\.1:5000/healthdeploy-test/hdtsw/backend@sha256:[0-9a-f]{64}", stack_file)
    spec = manager_docker(env, "service", "inspect", f"{STACK}_backend", f"{STACK}_postgres").stdout
    env_of_task = docker(env.edge, "inspect", env.container_of(env.edge, "backend")).stdout
    for secret in SECRETS:
        assert secret not in stack_file and secret not in spec and secret not in env_of_task
    assert '"endpoint_mode"' not in spec and '"Mode": "dnsrr"' in spec
    # A second deploy of the same source and settings changes nothing and takes no lock.
    again = deploy(env, "--json")
    assert again.returncode == 0 and summary(again)["hosts"][0]["result"] == "unchanged", again.stderr


def test_ten_changed_backend_deploys_under_load_fail_no_request(swarm_cluster):
    env = swarm_cluster
    write_rows(env, 20)
    before = checksum(env)
    data_tasks = manager_docker(env, "service", "ps", "-q", f"{STACK}_postgres", f"{STACK}_redis").stdout.split()
    seconds = []
    with Load(env.edge.address, 5000, rate=100, limit_s=3600) as load:
        time.sleep(1)
        for i in range(10):
            env.set_build("backend", f"backend-swarm-{i}")
            started = time.monotonic()
            proc = deploy(env, "--json")
            seconds.append(round(time.monotonic() - started, 1))
            assert proc.returncode == 0, proc.stderr
            assert summary(proc)["hosts"][0]["services"] == ["backend"]  # only what changed
        time.sleep(1)
    result = load.result
    RESULTS["10 deploys"] = {"failed": result.failed, "total": result.total, "seconds": seconds,
                             "p99_ms": round(result.p99_ms())}
    assert result.failed == 0, (result.errors[:5], seconds)
    assert result.total > 1000
    assert "backend-swarm-9" in result.builds and len(result.builds) >= 10, (result.builds, seconds)
    assert get_json(env.url(5000, "/api/build"))["build"] == "backend-swarm-9"
    # The data layer was not touched by ten application deploys, and its rows are all there.
    assert manager_docker(env, "service", "ps", "-q", f"{STACK}_postgres", f"{STACK}_redis").stdout.split() == data_tasks
    assert int(checksum(env).split()[0]) >= int(before.split()[0])  # row counts (as text, "14477" < "20")


def test_a_broken_build_is_rolled_back_by_itself_with_no_failed_request(swarm_cluster):
    env = swarm_cluster
    live = (env.deploy_root() / "current").resolve().name
    env.set_build("backend", "backend-broken")
    (env.app / "backend" / "health_mode").write_text("fail\n")
    try:
        with Load(env.edge.address, 5000, rate=100) as load:
            time.sleep(1)
            started = time.monotonic()
            proc = deploy(env, "--json")
            RESULTS["broken build s"] = round(time.monotonic() - started, 1)
            time.sleep(1)
    finally:
        (env.app / "backend" / "health_mode").unlink()
        env.set_build("backend", "backend-swarm-9")
    RESULTS["broken build"] = {"failed": load.result.failed, "total": load.result.total}
    assert proc.returncode == 5, proc.stderr  # rolled back
    assert "backend failed" in proc.stderr and "rolled back" in proc.stderr
    assert load.result.failed == 0, load.result.errors[:5]
    assert set(load.result.builds) == {"backend-swarm-9"}  # the old build served throughout
    assert (env.deploy_root() / "current").resolve().name == live
    spec = json.loads(manager_docker(env, "service", "inspect", f"{STACK}_backend").stdout)[0]
    assert spec["Spec"]["Labels"]["healthdeploy.release"] == live  # Swarm put the live spec back
    assert get_json(env.url(5000, "/api/build"))["build"] == "backend-swarm-9"
    # Back means settled: the replicas and no more (once, on a loaded run, 3 tasks ran just after): say what ran.
    tasks = manager_docker(env, "service", "ps", f"{STACK}_backend", "--no-trunc",
                           "--format", "{{.Name}} {{.Node}} {{.DesiredState}} {{.CurrentState}} {{.Error}}").stdout
    assert len(running_nodes(env, "backend")) == 2, f"{tasks}\n{proc.stderr[-3000:]}"


def test_rollback_returns_to_the_previous_release(swarm_cluster):
    env = swarm_cluster
    with Load(env.edge.address, 5000, rate=100) as load:
        time.sleep(1)
        proc = env.fab("rollback")
        time.sleep(1)
    RESULTS["rollback"] = {"failed": load.result.failed, "total": load.result.total}
    assert proc.returncode == 0, proc.stderr
    assert "building" not in proc.stderr
    assert load.result.failed == 0, load.result.errors[:5]
    assert get_json(env.url(5000, "/api/build"))["build"] == "backend-swarm-8"


def test_a_worker_cut_off_under_load_loses_only_what_was_in_flight(swarm_cluster):
    env = swarm_cluster
    cut = env.other  # app + edge; the load goes through the other edge node
    assert running_nodes(env, "backend") == sorted([env.edge.name, cut.name])  # spread: one task each
    with Load(env.edge.address, 5000, rate=100) as load:
        time.sleep(2)
        started = time.monotonic()
        netns.cut(cut.name)
        cut_at = time.monotonic()  # a request sent while the link went down was in flight at the cut
        try:
            # Every stateless service runs all its tasks again, on the remaining app node.
            wait_until(lambda: all(running_nodes(env, s) == [env.edge.name] * 2
                                   for s in ("backend", "ai-service", "frontend-web", "frontend-patient")),
                       120, "tasks rescheduled")
            rescheduled = round(time.monotonic() - started, 1)
            time.sleep(3)
        finally:
            during = (load.result.failed, load.result.total)
            netns.heal(cut.name)
    late = [(round(t - started, 2), round(d, 1), e) for t, d, e in load.result.failures if t >= cut_at]
    RESULTS["node cut"] = {"failed": during[0], "total": during[1], "rescheduled_s": rescheduled,
                           "failed_started_after_the_cut": len(late), "errors": sorted(set(load.result.errors))[:5]}
    # Only what was in flight to the cut node fails: every failed request had started before the cut (a request
    # sent after it whose connect to the cut node times out is retried on the other task by the gateway).
    assert not late, late[:10]
    assert during[0] <= 16, load.result.errors[:10]  # the load's 16 workers: never more in flight than that
    wait_until(lambda: "Ready" in manager_docker(env, "node", "inspect", cut.name, "--format", "{{.Status.State}}")
               .stdout.title(), 90, f"{cut.name} ready again")
    # The next deploy succeeds, and spreads the tasks over both app nodes again.
    env.set_build("backend", "backend-after-heal")
    proc = deploy(env, "--json")
    assert proc.returncode == 0, proc.stderr
    for service in ("backend", "ai-service", "frontend-web", "frontend-patient"):
        assert running_nodes(env, service) == sorted([env.edge.name, env.other.name]), service
    assert get_json(env.url(5000, "/api/build", env.other))["build"] == "backend-after-heal"


def _restart_engine(node: netns.Node) -> None:
    """The node's dockerd stopped (by its pid file) and started again, as a reboot of the engine would."""
    netns._stop_pid(netns.dockerd_pid(node), netns.STOP_TIMEOUT)
    netns._start_dockerd(node)
    netns._wait_dockerd(node)


def test_postgres_data_survives_a_deploy_an_engine_restart_and_a_backup_restore(swarm_cluster):
    env = swarm_cluster
    write_rows(env, 25)
    first = checksum(env)
    influx(env, write="bp,patient=1 sys=120,dia=80 1700000000000000000\nbp,patient=2 sys=130,dia=85 "
                      "1700000001000000000\nhr,patient=1 bpm=70 1700000002000000000")
    points = json.dumps(influx(env, "SELECT * FROM /.*/"), sort_keys=True)
    assert '"hr"' in points and '"bp"' in points
    env.set_build("backend", "backend-pg-1")
    assert deploy(env).returncode == 0
    assert checksum(env) == first
    _restart_engine(env.manager)  # the data node (and manager) engine
    wait_until(lambda: env.fab("health").returncode == 0, 180, "the stack healthy after the engine restart", 3)
    assert checksum(env) == first
    backup = env.inv("backup", "--json")
    assert backup.returncode == 0, backup.stderr
    set_name = json.loads(backup.stdout)["set"].rsplit("/", 1)[-1]
    # Destroy: the service and its volume are gone; a deploy brings up an empty PostgreSQL.
    assert manager_docker(env, "service", "rm", f"{STACK}_postgres").returncode == 0
    wait_until(lambda: not env.container_of(env.manager, "postgres"), 60, "postgres gone")
    # The task's container may still exist (stopped) for a moment, and a volume in use is not removed.
    wait_until(lambda: docker(env.manager, "volume", "rm", f"{STACK}_postgres-data").returncode == 0
               or f"{STACK}_postgres-data" not in docker(env.manager, "volume", "ls", "-q").stdout.split(),
               60, "the postgres volume removed")
    proc = deploy(env)
    assert proc.returncode == 0, proc.stderr
    assert "postgres: created" in proc.stderr
    fresh = env.container_of(env.manager, "postgres")
    # Empty: no requests table, or (the deploy migrated the new database) one without a row.
    if psql(env.manager, fresh, "SELECT count(*) FROM pg_tables WHERE tablename = 'requests'") == "1":
        assert psql(env.manager, fresh, "SELECT count(*) FROM requests") == "0"
    # InfluxDB: a measurement dropped after the backup.
    influx(env, "DROP MEASUREMENT hr", post=True)
    assert '"hr"' not in json.dumps(influx(env, "SELECT * FROM /.*/"))
    # The whole set, beside the live data (InfluxDB 1.x included), the writers scaled to 0 and back.
    started = time.monotonic()
    restore = env.inv("restore", "--from", set_name, "--yes", "--json")
    assert restore.returncode == 0, restore.stdout[-2000:] + restore.stderr
    restore_s = round(time.monotonic() - started, 1)
    result, _ = json.JSONDecoder().raw_decode(restore.stdout.lstrip())  # the result, then `fab health`'s table
    assert result.get("stores") == {"postgres": "restored", "influxdb": "restored", "minio": "restored"}, result
    assert result.get("safety_verified") == "ok"
    assert "scaling the application's writers to 0" in restore.stderr
    assert checksum(env) == first
    assert json.dumps(influx(env, "SELECT * FROM /.*/"), sort_keys=True) == points
    assert get_json(env.url(5000, "/api/build"))["last_request_id"] > 0  # the application reads it again
    RESULTS["postgres survival"] = {"rows": first.split()[0], "checksum": first.split()[1], "restore_s": restore_s,
                                    "writers_down_s": result.get("writers_down_s")}


def test_backup_sets_cross_between_compose_and_swarm(swarm_cluster):
    env = swarm_cluster
    data = env.manager
    # The Compose target of the same environment on the data node: PostgreSQL and Redis behind its gateway.
    env.write_compose(DISABLED_SERVICES="mongodb,qdrant,influxdb,emqx,minio", BACKUP_SERVICES="postgres")
    env.write(BACKUP_SERVICES="postgres")
    proc = env.run("fab", "-H", data.name, "deploy", timeout=900, compose=True)
    assert proc.returncode == 0, proc.stderr
    compose_pg = "hd-tsw-compose-postgres-1"
    for i in range(15):
        get_json(f"http://{data.address}:5000/api/echo", data=b'{"compose": %d}' % i)
    compose_sum = psql(data, compose_pg, CHECKSUM_SQL)
    # compose -> swarm
    made = env.run("inv", "backup", "--env", ENV_NAME, "--json", compose=True)
    assert made.returncode == 0, made.stderr
    compose_set = json.loads(made.stdout)["set"].rsplit("/", 1)[-1]
    restore = env.inv("restore", "--from", compose_set, "--yes", "--other-host")
    assert restore.returncode == 0, restore.stdout[-2000:] + restore.stderr
    assert checksum(env) == compose_sum
    # swarm -> compose
    write_rows(env, 10)
    swarm_sum = checksum(env)
    made = env.inv("backup", "--json")
    assert made.returncode == 0, made.stderr
    swarm_set = json.loads(made.stdout)["set"].rsplit("/", 1)[-1]
    assert env.inv("backup.verify", "--from", swarm_set).returncode == 0
    restore = env.run("inv", "restore", "--env", ENV_NAME, "--from", swarm_set, "--yes", "--other-host", compose=True)
    assert restore.returncode == 0, restore.stdout[-2000:] + restore.stderr
    assert psql(data, compose_pg, CHECKSUM_SQL) == swarm_sum
    RESULTS["cross-target"] = {"compose->swarm": compose_sum.split()[0], "swarm->compose": swarm_sum.split()[0]}
    env.write()


def test_checklist_status_logs_and_exec_work_on_swarm(swarm_cluster):
    env = swarm_cluster
    (env.directory / f"{ENV_NAME}.checklist.toml").write_text((PROJECT_ROOT / "env/sandbox.checklist.toml").read_text())
    proc = env.inv("checklist", "--json")
    report = json.loads(proc.stdout)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert proc.returncode == 0, failed
    status = env.fab("status", "--json")
    assert status.returncode == 0 and {r["service"] for r in json.loads(status.stdout)["services"]} >= {"backend", "postgres"}
    logs = env.fab("logs", "backend", "--tail", "3")
    assert logs.returncode == 0 and "[backend]" in logs.stdout
    exec_ = env.fab("exec", "backend", "--", "sh", "-c", "echo from-$SERVICE; exit 3")
    assert exec_.returncode == 103 and "from-backend" in exec_.stdout
    print("\nswarm results: " + json.dumps(RESULTS))
