"""Several hosts for real, on the namespaced test bed (each node its own dockerd, sshd and address):
one data host shared by two application hosts, and independent cells.

- the first deploy migrates once; a row written through app host 2 is in the next backup and comes back
  after a restore; a changed backend rolls on both app hosts with 0 failed requests on each (load through
  each host's own gateway); an app-only deploy leaves the data host's containers untouched;
- app host 2 cut off mid-deploy: a clear error naming it, app host 1 serves one release completely, the
  lock is released or provably stale, and the next deploy after the host is back succeeds;
- cells: migrations on both hosts, one backup set per host, a restore of host 1's set onto host 2 refused.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest

from deploy.commands.presence import LEASE_S
from deploy.sandbox import netns
from load import Load
from sandbox_env import new_env
from testbed_env import TESTBED_NODES, docker

DATA, APP1, APP2 = TESTBED_NODES[:3]
NODE = {n: netns.node_for(n) for n in (DATA, APP1, APP2)}
ADDRESS = {n: NODE[n].address for n in NODE}


def cleanup(env_name: str) -> None:
    """Our leftovers on each node's engine, by name (Docker state outlives a run)."""
    for name, node in NODE.items():
        ids = docker(node, "ps", "-aq", "--filter", f"label=com.docker.compose.project=hd-t{env_name}-{name}").stdout.split()
        if ids:
            docker(node, "rm", "-f", "-v", *ids)
        docker(node, "network", "rm", f"hd-t{env_name}-{name}_default")
        volumes = docker(node, "volume", "ls", "-q", "--filter", f"name=hd-t{env_name}-{name}_").stdout.split()
        if volumes:
            docker(node, "volume", "rm", *volumes)
        subprocess.run(["rm", "-rf", f"/var/lib/healthdeploy-test/{name}/{env_name}"])


def hosts_of(proc) -> dict:
    return {h["host"]: h for h in json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]}


def containers(node: str, env_name: str) -> dict[str, str]:
    out = docker(NODE[node], "ps", "--filter", f"label=com.docker.compose.project=hd-t{env_name}-{node}",
                 "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}').stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()}


def post(node: str) -> dict:
    request = urllib.request.Request(f"http://{ADDRESS[node]}:5000/api/echo", data=b'{"n": 1}', method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def get_build(node: str) -> str:
    with urllib.request.urlopen(f"http://{ADDRESS[node]}:5000/api/build", timeout=10) as response:
        return json.loads(response.read())["build"]


def sql(env_name: str, query: str) -> str:
    out = docker(NODE[DATA], "exec", f"hd-t{env_name}-{DATA}-postgres-1", "psql", "-U", "admin", "-d", "health_mgmt",
                 "-tAc", query)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def shared(testbed_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "top")
    env.write(hosts=f"{DATA},{APP1},{APP2}", ROLES=f"{DATA}=data,{APP1}=app,{APP2}=app", BATCH_SIZE="2",
              COMPOSE_PROJECT="hd-t{env}-{host}")
    cleanup("top")
    yield env
    cleanup("top")


def fab(env, *args, timeout=900):
    return env.run("fab", args[0], "--env", env.name, *args[1:], timeout=timeout)


def test_first_deploy_migrates_once_and_each_role_runs_its_services(shared):
    proc = fab(shared, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr
    hosts = hosts_of(proc)
    assert list(hosts) == [DATA, APP1, APP2]  # the data host first, then the primary application host
    assert [hosts[h]["role"] for h in hosts] == ["data", "app", "app"]
    assert hosts[APP1]["migrated"] is True and hosts[APP2]["migrated"] is False and hosts[DATA]["migrated"] is False
    assert proc.stderr.count("migrating:") == 1
    assert set(containers(DATA, "top").values()) == {"postgres", "redis", "influxdb", "emqx", "minio"}
    for app in (APP1, APP2):
        assert set(containers(app, "top").values()) == {"gateway", "backend", "ai-service", "frontend-web",
                                                       "frontend-patient"}
        assert get_build(app) == "backend-v1"  # the API reads the shared database on the data host
    health = fab(shared, "health", "--json")
    assert health.returncode == 0, health.stdout[-2000:]
    data = json.loads(health.stdout)
    assert {h["host"]: h["role"] for h in data["hosts"]} == {DATA: "data", APP1: "app", APP2: "app"}
    checks = {(c["host"], c["name"]): c for h in data["hosts"] for c in h["checks"]}
    assert checks[(APP2, "postgres.tcp")]["detail"] == f"{ADDRESS[DATA]}:5432 answers"  # over the private network
    assert checks[(DATA, "port.5432")]["status"] == "pass"  # published on the private address only, never public


def test_a_row_written_through_app_host_2_is_backed_up_and_restored(shared):
    row = post(APP2)["id"]
    assert sql("top", f"select count(*) from requests where id = {row}") == "1"
    backup = shared.run("inv", "backup", "--env", "top", "--services", "postgres", "--json", timeout=600)
    assert backup.returncode == 0, backup.stderr
    manifest = json.loads(backup.stdout)["manifest"]
    assert manifest["host"] == DATA and manifest["role"] == "data"
    sql("top", f"delete from requests where id = {row}")
    restore = shared.run("inv", "restore", "--env", "top", "--from", "latest", "--yes", timeout=900)
    assert restore.returncode == 0, restore.stderr + restore.stdout
    assert sql("top", f"select count(*) from requests where id = {row}") == "1"


def test_a_changed_backend_rolls_on_both_app_hosts_with_zero_failed_requests(shared):
    before = containers(DATA, "top")
    shared.set_build("backend", "backend-v2")
    with Load(ADDRESS[APP1], 5000, rate=50) as load1, Load(ADDRESS[APP2], 5000, rate=50) as load2:
        time.sleep(1.5)
        proc = fab(shared, "deploy", "--json")
        time.sleep(1.5)
    assert proc.returncode == 0, proc.stderr
    hosts = hosts_of(proc)
    assert hosts[APP1]["services"] == ["backend"] and hosts[APP2]["services"] == ["backend"]
    assert hosts[DATA]["result"] == "unchanged" and hosts[APP1]["migrated"] is True
    for load in (load1, load2):
        assert load.result.total > 100 and load.result.failed == 0, load.result.errors[:5]
    assert get_build(APP1) == get_build(APP2) == "backend-v2"
    assert containers(DATA, "top") == before  # same data containers: nothing there was restarted


def test_app_host_2_cut_off_mid_deploy(shared):
    shared.set_build("backend", "backend-v3")
    shared.write(hosts=f"{DATA},{APP1},{APP2}", ROLES=f"{DATA}=data,{APP1}=app,{APP2}=app", BATCH_SIZE="1",
                 COMPOSE_PROJECT="hd-t{env}-{host}", SSH_CONNECT_TIMEOUT="3")
    done = threading.Event()
    cut_at: list[float] = []

    def cut_when_host_1_is_done():  # app host 1 is rolled first (BATCH_SIZE=1); cut host 2 as its turn starts
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not done.is_set():
            try:
                if get_build(APP1) == "backend-v3":
                    break
            except Exception:
                pass
            time.sleep(0.2)
        netns.cut(APP2)
        cut_at.append(time.monotonic())

    cutter = threading.Thread(target=cut_when_host_1_is_done)
    with Load(ADDRESS[APP1], 5000, rate=50) as load1:
        cutter.start()
        proc = fab(shared, "deploy", "--json", timeout=900)
        done.set()
        cutter.join()
    try:
        assert proc.returncode != 0
        assert APP2 in proc.stderr.splitlines()[-1] or f"{APP2}:" in proc.stderr  # the error names the host
        assert "Traceback" not in proc.stderr
        # App host 1 serves one release completely: every request answered, and only one build at the end.
        assert load1.result.failed == 0, load1.result.errors[:5]
        assert get_build(APP1) == "backend-v3"
        # Host 2 stays cut off past the lease. Its sshd (Debian's defaults, no ClientAliveInterval) never learns
        # that our connection is gone, and nothing reaches it: only the lock's lease can free the lock.
        time.sleep(max(0.0, cut_at[0] + LEASE_S + 10 - time.monotonic()))
    finally:
        netns.heal(APP2)

    def lock_states():
        status = fab(shared, "lock.status", "--json")
        assert status.returncode == 0, status.stderr
        return {r["host"]: r["state"] for r in json.loads(status.stdout)["locks"]}

    states = lock_states()
    deadline = time.monotonic() + 30  # the holder's undo may still be running
    while states[APP2] == "held" and time.monotonic() < deadline:
        time.sleep(2)
        states = lock_states()
    assert states == {DATA: "free", APP1: "free", APP2: "free"}, states
    audit = fab(shared, "audit", "--json", "--lines", "50")
    reasons = [e.get("reason", "") for e in json.loads(audit.stdout)["entries"]]
    assert any("silent for the lease" in r for r in reasons), reasons  # released by the lease, and audited
    again = fab(shared, "deploy", "--json")
    assert again.returncode == 0, again.stderr
    assert get_build(APP2) == "backend-v3" and get_build(APP1) == "backend-v3"


@pytest.fixture(scope="module")
def cells(testbed_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "cel")
    env.write(hosts=f"{APP1},{APP2}", TOPOLOGY="cells")
    cleanup("top")  # the shared-data tests above are done: their gateways hold the same ports on these nodes
    cleanup("cel")
    yield env
    cleanup("cel")


def test_cells_migrate_each_back_up_each_and_refuse_a_foreign_restore(cells):
    proc = fab(cells, "deploy", "--json")
    assert proc.returncode == 0, proc.stderr
    hosts = hosts_of(proc)
    assert hosts[APP1]["migrated"] is True and hosts[APP2]["migrated"] is True
    backup = cells.run("inv", "backup", "--env", "cel", "--services", "postgres", "--json", timeout=600)
    assert backup.returncode == 0, backup.stderr
    sets = json.loads(backup.stdout)["sets"]
    assert sorted(s["manifest"]["host"] for s in sets) == sorted([APP1, APP2])  # one set per host
    host1_set = next(s["set"] for s in sets if s["manifest"]["host"] == APP1)
    refused = cells.run("inv", "restore", "--env", "cel", "--from", host1_set, "--host", APP2, "--yes")
    assert refused.returncode == 2 and f"was taken on {APP1}, not on {APP2}" in refused.stderr
    unnamed = cells.run("inv", "restore", "--env", "cel", "--from", host1_set, "--yes")
    assert unnamed.returncode == 2 and "name the host" in unnamed.stderr
